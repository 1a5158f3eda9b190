"""RedisSink specifics: entry layout, dedup markers, the items hash, round trips, outages.

The behaviour every sink shares is in ``test_sinks_contract.py``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio

from bridge.errors import ConfigError, PublishError
from bridge.events import Modified, Removed
from bridge.sinks.redis import EVENTS_PER_CALL, RedisSink, RedisSinkConfig, items_key, redact_url
from bridge.subjects import redis_stream_key
from tests.servers import RedisServer, free_port
from tests.test_sinks_contract import (
    Entry,
    decode_redis,
    expected,
    http_event,
    object_events,
    pause,
    xrange,
)

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
        b"data": body,
    }
    assert list(fields)[:2] == [b"ce-specversion", b"ce-id"]


async def test_structured_entry_field(redis_url: str, client: redis.asyncio.Redis) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_url, content_mode="structured"))
    event = http_event(source_name="web")
    try:
        await sink.publish("web", [event])  # connects by itself
    finally:
        await sink.aclose()
    [(_id, fields)] = await xrange(client, redis_stream_key("web"))
    assert fields == {b"event": event.to_structured()}
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
    marker = f"{STREAM}:ids:{events[0].id}"
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


async def test_one_round_trip_per_batch(sink: RedisSink, client: redis.asyncio.Redis) -> None:
    events = object_events([f"k{i}" for i in range(EVENTS_PER_CALL * 2 + 1)])
    await client.config_resetstat()
    await sink.publish("files", events)
    stats = await client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3  # one pipeline: three script calls
    assert await client.xlen(STREAM) == len(events)


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


async def test_a_lost_script_cache_is_reloaded(
    sink: RedisSink, client: redis.asyncio.Redis
) -> None:
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


async def test_hanging_server_fails_within_the_timeout(
    redis_server: RedisServer, sink: RedisSink, client: redis.asyncio.Redis
) -> None:
    events = object_events(["a", "b"])
    pause(redis_server)
    try:
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
    ],
)
def test_invalid_config(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RedisSinkConfig(**settings)
