"""RedisSink specifics: entry layout, dedup markers, the items hash, round trips, outages.

The behaviour every sink shares is in ``test_sinks_contract.py``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio
import redis.crc
import redis.exceptions
from redis.asyncio.connection import AbstractConnection

import bridge.sinks.redis
from bridge.cloudevents import header_value, state_headers
from bridge.errors import ConfigError, PublishError
from bridge.events import Modified, Removed
from bridge.secrets import redact_url
from bridge.sinks.redis import (
    EVENTS_PER_TRANSACTION,
    RedisSink,
    RedisSinkConfig,
    items_key,
    marker_key,
)
from bridge.subjects import redis_stream_key
from tests.support.events import (
    Entry,
    decode_redis,
    expected,
    http_event,
    object_events,
    xrange,
)
from tests.support.servers import RedisServer, free_port

pytestmark = pytest.mark.servers

STREAM = redis_stream_key("files")


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    made = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def sink(redis_url: str) -> AsyncIterator[RedisSink]:
    made = RedisSink(RedisSinkConfig(url=redis_url, timeout_s=2.0))
    await made.connect()
    try:
        yield made
    finally:
        await made.aclose()


async def read(client: redis.asyncio.Redis, source: str = "files") -> list[dict[str, Any]]:
    return [decode_redis(fields) for _id, fields in await xrange(client, redis_stream_key(source))]


async def test_binary_entry_fields(sink: RedisSink, client: redis.asyncio.Redis) -> None:
    event = http_event(source_name="web")
    await sink.publish("web", [event])
    [(_id, fields)] = await xrange(client, redis_stream_key("web"))
    headers, body = event.to_binary()
    assert fields == {
        **{k.encode(): v.encode() for k, v in headers.items()},
        **{k.encode(): v.encode() for k, v in state_headers(event).items()},
        b"data": body,
    }
    assert list(fields)[:2] == [b"ce-specversion", b"ce-id"]
    assert fields[b"koprs-kind"] == b"added"


async def test_binary_fields_are_percent_encoded(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    keys = ["  padded  ", "cr\r\nlf", "ünï 100%"]
    await sink.publish("files", object_events(keys))
    entries = await xrange(client, STREAM)
    assert [fields[b"ce-subject"] for _id, fields in entries] == [
        b"%20%20padded%20%20",
        b"cr%0D%0Alf",
        b"%C3%BCn%C3%AF%20100%25",
    ]
    assert [header_value(fields[b"ce-subject"].decode()) for _id, fields in entries] == keys


async def test_structured_entry_field(redis_url: str, client: redis.asyncio.Redis) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_url, content_mode="structured"))
    event = http_event(source_name="web")
    try:
        await sink.publish("web", [event])  # connects by itself
    finally:
        await sink.aclose()
    [(_id, fields)] = await xrange(client, redis_stream_key("web"))
    assert fields == {
        b"event": event.to_structured(),
        **{k.encode(): v.encode() for k, v in state_headers(event).items()},
    }
    assert fields[b"koprs-revision"] == str(event.revision).encode()
    assert decode_redis(fields) == expected([event])[0]


async def test_dedup_markers_expire_after_the_window(
    redis_url: str, client: redis.asyncio.Redis
) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_url, dedup_window_s=600.5))
    events = object_events(["a"])
    try:
        await sink.publish("files", events)
    finally:
        await sink.aclose()
    marker = marker_key("files", events[0].id)
    [(entry_id, _fields)] = await xrange(client, STREAM)
    assert await client.get(marker) == entry_id
    assert 0 < await client.ttl(marker) <= math.ceil(600.5)


async def test_items_hash_follows_the_stream(sink: RedisSink, client: redis.asyncio.Redis) -> None:
    await sink.publish("files", object_events(["a", "b", "c"]))
    await sink.publish(
        "files",
        [
            *object_events(["a"], kind=Modified, revision=2, etag="e2"),
            *object_events(["b"], kind=Removed, revision=2),
        ],
    )
    entries = await xrange(client, STREAM)
    ids = [entry_id for entry_id, _fields in entries]
    assert await client.hgetall(items_key("files")) == {b"a": ids[3], b"c": ids[2]}


async def test_a_republished_event_changes_nothing(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    first = object_events(["a"])
    modified = object_events(["a"], kind=Modified, revision=2, etag="e2")
    await sink.publish("files", [*first, *modified])
    items = await client.hgetall(items_key("files"))
    await sink.publish("files", first)  # a stale retry must not roll the item back
    assert await client.hgetall(items_key("files")) == items
    assert await read(client) == expected([*first, *modified])


async def test_keys_are_documented_and_share_one_cluster_slot(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    events = object_events(["a", "b"])
    await sink.publish("files", events)
    assert set(await client.keys("*")) == {
        b"koprs:external:files",
        b"{koprs:external:files}:items",
        f"{{koprs:external:files}}:ids:{events[0].id}".encode(),
        f"{{koprs:external:files}}:ids:{events[1].id}".encode(),
    }
    for source in ("files", "web", "a", "Z-9_x"):
        stream = redis_stream_key(source)
        slots = {
            redis.crc.key_slot(key.encode())
            for key in (stream, items_key(source), marker_key(source, events[0].id))
        }
        assert slots == {redis.crc.key_slot(stream.encode())}


def count_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that counts the writes (round trips) of every Redis connection from now on (the
    test's own client included)."""
    sends = [0]
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        sends[0] += 1
        await original(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sends


async def test_two_round_trips_per_new_batch(
    sink: RedisSink, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = object_events([f"k{i}" for i in range(EVENTS_PER_TRANSACTION)])
    await client.config_resetstat()
    sends = count_round_trips(monkeypatch)
    await sink.publish("files", events)
    assert sends == [2]
    stats = await client.info("commandstats")
    assert stats["cmdstat_xadd"]["calls"] == len(events)
    for command in ("watch", "exists", "multi", "exec", "hset"):
        assert stats[f"cmdstat_{command}"]["calls"] == 1, command
    assert stats["cmdstat_eval"]["calls"] == 2  # reading the last entry id; setting the markers
    assert stats["cmdstat_set"]["calls"] == len(events)  # called by the script
    assert "cmdstat_mget" not in stats
    assert await client.xlen(STREAM) == len(events)

    sends[0] = 0
    await sink.publish("files", events)  # all duplicates: read, then UNWATCH
    assert sends == [2]
    assert await client.xlen(STREAM) == len(events)

    sends[0] = 0
    more = object_events(["more"])
    await sink.publish("files", [*events[:10], *more])  # partly published: MGET in between
    assert sends == [3]
    assert await client.xlen(STREAM) == len(events) + 1


async def test_a_larger_batch_is_published_in_transactions(
    sink: RedisSink, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = object_events([f"k{i}" for i in range(EVENTS_PER_TRANSACTION * 2 + 1)])
    await client.config_resetstat()
    sends = count_round_trips(monkeypatch)
    await sink.publish("files", events)
    assert sends == [6]
    assert (await client.info("commandstats"))["cmdstat_exec"]["calls"] == 3
    assert await read(client) == expected(events)


async def test_parts_are_bounded_in_bytes(
    sink: RedisSink, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = object_events([f"k{i:02d}" for i in range(20)])
    size = len(events[0].data_bytes()) + sum(len(v) for v in events[0].to_binary()[0].values())
    monkeypatch.setattr(bridge.sinks.redis, "BYTES_PER_TRANSACTION", 7 * size)
    await client.config_resetstat()
    await sink.publish("files", events)
    assert (await client.info("commandstats"))["cmdstat_exec"]["calls"] == 3  # 7 + 7 + 6
    assert await read(client) == expected(events)


async def test_a_batch_that_failed_half_way_is_completed_by_the_retry(
    sink: RedisSink, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge.sinks.redis, "EVENTS_PER_TRANSACTION", 10)
    events = object_events([f"k{i:02d}" for i in range(25)])
    original = bridge.sinks.redis._next_ids
    calls: list[int] = []

    def second_part_fails(last: tuple[int, int], now_ms: int, count: int) -> list[bytes]:
        calls.append(count)
        if len(calls) > 1:
            raise redis.exceptions.ConnectionError("connection lost (test)")
        return original(last, now_ms, count)

    monkeypatch.setattr(bridge.sinks.redis, "_next_ids", second_part_fails)
    with pytest.raises(PublishError, match="25 events of 'files' not acknowledged"):
        await sink.publish("files", events)
    assert calls == [10, 10, 10, 10]  # the second part, tried three times
    assert await read(client) == expected(events[:10])

    monkeypatch.setattr(bridge.sinks.redis, "_next_ids", original)
    await sink.publish("files", events)
    assert await read(client) == expected(events)


async def test_an_event_that_cannot_be_encoded_fails_its_part_only(
    sink: RedisSink, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next part is encoded while the server runs the current one: an encoding error
    there must not disturb the transaction in flight."""
    monkeypatch.setattr(bridge.sinks.redis, "EVENTS_PER_TRANSACTION", 2)
    good = object_events(["a", "b"])
    bad = object_events(["lone \udcff surrogate"])
    with pytest.raises(UnicodeEncodeError):
        await sink.publish("files", [*good, *bad])
    assert await read(client) == expected(good)


async def test_an_id_twice_in_one_batch_is_added_once(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    added = object_events(["a", "b"])
    removed = object_events(["a"], kind=Removed, revision=2)
    readded = object_events(["a"], kind=Modified, revision=3, etag="e3")
    await sink.publish("files", [*added, *added, *removed, *readded, *removed])
    assert await read(client) == expected([*added, *removed, *readded])
    entry_ids = [entry_id for entry_id, _fields in await xrange(client, STREAM)]
    assert await client.hgetall(items_key("files")) == {b"a": entry_ids[3], b"b": entry_ids[1]}


async def test_entry_ids_are_like_automatic_ones(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    await client.xadd(STREAM, {"x": "1"}, id="99999999999999-5")  # a clock far ahead
    await sink.publish("files", object_events(["a", "b"]))
    ids = [entry_id for entry_id, _fields in await xrange(client, STREAM)]
    assert ids == [b"99999999999999-5", b"99999999999999-6", b"99999999999999-7"]
    await client.delete(STREAM)

    seconds, micros = await client.time()
    await sink.publish("files", object_events(["c"], revision=2))
    [(entry_id, _fields)] = await xrange(client, STREAM)
    ms, seq = map(int, entry_id.split(b"-"))
    assert 0 <= ms - (seconds * 1000 + micros // 1000) < 5000
    assert seq == 0


async def test_a_concurrent_change_is_retried_without_duplicates(
    sink: RedisSink, client: redis.asyncio.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another publisher of the same source (split brain) adds one of the events between the
    two round trips: the transaction is dropped (WATCH) and done again, adding only the rest."""
    events = object_events(["a", "b", "c"])
    other = redis.Redis.from_url(redis_url)
    original = bridge.sinks.redis._next_ids
    calls: list[int] = []

    def meddle(last: tuple[int, int], now_ms: int, count: int) -> list[bytes]:
        calls.append(count)
        if len(calls) == 1:  # as the other publisher's transaction would
            entry_id = other.xadd(STREAM, {"ce-id": events[1].id})
            other.set(marker_key("files", events[1].id), entry_id, ex=60)
        return original(last, now_ms, count)

    monkeypatch.setattr(bridge.sinks.redis, "_next_ids", meddle)
    try:
        await sink.publish("files", events)
    finally:
        other.close()
    assert calls == [3, 2]  # the second time, b was known
    subjects = [fields.get(b"ce-subject") for _id, fields in await xrange(client, STREAM)]
    assert subjects == [None, b"a", b"c"]  # b: only the other publisher's entry


async def test_a_lost_acknowledgement_does_not_duplicate(
    sink: RedisSink, client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXEC ran but its reply was lost: trying again finds every marker and adds nothing."""
    original = bridge.sinks.redis._exec_reply
    lost: list[object] = []

    async def lose_once(conn: AbstractConnection) -> object:
        reply = await original(conn)
        if not lost:
            lost.append(reply)
            raise redis.exceptions.ConnectionError("connection lost (test)")
        return reply

    monkeypatch.setattr(bridge.sinks.redis, "_exec_reply", lose_once)
    events = object_events(["a", "b"])
    await sink.publish("files", events)
    assert lost
    assert await read(client) == expected(events)


async def test_a_refused_transaction_leaves_nothing_behind(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    """A command refused while queued (here: out of memory) aborts the whole transaction: no
    entry, no marker, no item; the retried batch then lands whole."""
    await sink.publish("files", object_events(["a"]))
    keys = set(await client.keys("*"))
    events = object_events(["b", "c"])
    await client.config_set("maxmemory", "1")
    try:
        with pytest.raises(PublishError, match="maxmemory"):
            await sink.publish("files", events)
    finally:
        await client.config_set("maxmemory", "0")
    assert set(await client.keys("*")) == keys
    assert await client.xlen(STREAM) == 1
    assert await client.hkeys(items_key("files")) == [b"a"]
    await sink.publish("files", events)
    assert await read(client) == expected([*object_events(["a"]), *events])


async def test_maxlen_bounds_the_stream(redis_url: str, client: redis.asyncio.Redis) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_url, maxlen=100))
    try:
        for start in range(0, 2000, 200):
            await sink.publish("files", object_events([f"k{i}" for i in range(start, start + 200)]))
    finally:
        await sink.aclose()
    length = await client.xlen(STREAM)
    assert 100 <= length < 2000  # approximate trimming: whole macro nodes go
    [(_id, last)] = cast(list[Entry], await client.xrevrange(STREAM, count=1))
    assert decode_redis(last)["subject"] == "k1999"


async def test_a_flushed_script_cache_does_not_matter(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    await sink.publish("other", object_events(["z"], source_name="other"))
    await client.script_flush()
    events = object_events(["a"])
    await sink.publish("files", events)
    assert await read(client) == expected(events)


async def test_redis_errors_name_the_server(
    sink: RedisSink, client: redis.asyncio.Redis, redis_url: str
) -> None:
    await client.set(STREAM, "not a stream")
    with pytest.raises(PublishError, match="WRONGTYPE") as caught:
        await sink.publish("files", object_events(["a"]))
    assert redact_url(redis_url) in str(caught.value)


async def test_an_items_key_of_another_type_is_an_error(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    await client.set(items_key("files"), "not a hash")
    with pytest.raises(PublishError, match="WRONGTYPE"):
        await sink.publish("files", object_events(["a"]))
    assert await client.xlen(STREAM) == 0


async def test_hanging_server_fails_within_the_timeout(
    redis_server: RedisServer, sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    events = object_events(["a", "b"])
    redis_server.pause()
    try:
        # pause() returns once every thread is stopped (state T), not merely signalled
        stats = Path(f"/proc/{redis_server.pid}/task").glob("*/stat")
        assert {stat.read_text().rpartition(") ")[2][0] for stat in stats} == {"T"}
        with pytest.raises(PublishError, match="2 events of 'files' not acknowledged"):
            await sink.publish("files", events)
    finally:
        redis_server.resume()
    await sink.publish("files", events)  # what ran meanwhile is dropped as a duplicate
    assert await read(client) == expected(events)


async def test_publish_after_a_server_restart(
    redis_server: RedisServer, sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    await sink.publish("files", object_events(["a"]))
    redis_server.restart()  # no persistence: it comes back empty, without the script
    events = object_events(["b"])
    await sink.publish("files", events)
    assert await read(client) == expected(events)


async def test_connect_to_a_dead_address_fails() -> None:
    sink = RedisSink(RedisSinkConfig(url=f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(PublishError, match="cannot connect"):
        await sink.connect()
    await sink.aclose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis.example:6379/0", "redis://:***@redis.example:6379/0"),
        ("redis://bridge:s3cret@redis.example:6379/1", "redis://bridge:***@redis.example:6379/1"),
        ("rediss://s3cret@redis.example/0", "rediss://***@redis.example/0"),
        ("redis://redis.example:6379/0?password=s3cret", "redis://redis.example:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pa,ss@redis.example/0", "redis://:***@redis.example/0"),
        ("redis://:pa/ss@redis.example/0", "***"),  # '/' not percent-encoded: hide it all
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock"),
    ],
)
def test_description_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    sink = RedisSink(RedisSinkConfig(url=url))
    assert sink.description == f"{shown} streams koprs:external:*"
    assert "s3cret" not in repr(sink)


async def test_errors_do_not_reveal_the_password() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    sink = RedisSink(RedisSinkConfig(url=url))
    with pytest.raises(PublishError) as caught:
        await sink.connect()
    await sink.aclose()
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"content_mode": "xml"}, "content_mode"),
        ({"url": "http://x"}, "url"),
        ({"maxlen": 0}, "maxlen"),
        ({"dedup_window_s": 0}, "dedup_window_s"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"stream_prefix": "{koprs}:external:"}, "stream_prefix"),
    ],
)
def test_invalid_config(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RedisSinkConfig(**settings)
