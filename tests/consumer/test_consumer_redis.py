"""``RedisWatch`` against a real redis-server, fed by the real ``RedisSink``.

List-then-watch (items, Synced, live; no gap, no duplicate across the two), consumer groups
(resume, fan-out, work split, claiming a dead consumer's entries), nak, decode errors, trimmed
entries, and recovery after the server restarts empty.

"Nothing more was delivered" is checked without waiting for silence: a sentinel event is
published last and must be the very next item.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bridge.cloudevents import CloudEvent
from bridge.consumer import RedisWatch, watch_redis
from bridge.consumer.base import Delivery, Synced, WatchItem
from bridge.errors import ConfigError, DecodeError
from bridge.events import Added, ExternalEvent
from bridge.sinks.redis import RedisSink, RedisSinkConfig, items_key
from bridge.subjects import redis_stream_key
from tests.support.events import object_events, xrange
from tests.support.replicas import until
from tests.support.servers import RedisServer

pytestmark = pytest.mark.servers

FILES = redis_stream_key("files")
GROUPS = [None, "ops"]
"""Most behaviour must hold with and without a consumer group."""


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    # one immediate retry: its pooled connection is dead after a server restart
    made = redis.asyncio.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 1))
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def sink(redis_url: str) -> AsyncIterator[RedisSink]:
    made = RedisSink(RedisSinkConfig(url=redis_url))
    try:
        yield made
    finally:
        await made.aclose()


OpenWatch = Callable[..., RedisWatch]


@pytest.fixture
async def open_watch(redis_url: str) -> AsyncIterator[OpenWatch]:
    """``open_watch(*sources, **options)``: a watch closed at teardown (sources: ``files``)."""
    made: list[RedisWatch] = []

    def open_(*sources: str, **options: Any) -> RedisWatch:
        watch = watch_redis(redis_url, sources or ("files",), **options)
        made.append(watch)
        return watch

    try:
        yield open_
    finally:
        for watch in made:
            await watch.aclose()


_revisions = itertools.count(1)


def events(
    keys: Sequence[str],
    kind: type[ExternalEvent[Any]] = Added,
    *,
    etag: str = "e1",
    source: str = "files",
) -> list[CloudEvent]:
    """Object events; every call gets a new revision, so its event ids are new."""
    revision = next(_revisions)
    return object_events(keys, kind=kind, etag=etag, revision=revision, source_name=source)


async def take(watch: RedisWatch, count: int) -> list[WatchItem]:
    """The next ``count`` items (bounded, so a missing one fails the test instead of hanging)."""
    items: list[WatchItem] = []
    async with asyncio.timeout(10):
        while len(items) < count:
            items.append(await anext(watch))
    return items


async def settle(items: Sequence[WatchItem]) -> None:
    for item in items:
        if isinstance(item, Delivery):
            await item.ack()


Seen = tuple[str | None, str, str, str, bool] | str


def seen(items: Sequence[WatchItem]) -> list[Seen]:
    """(source, kind, key, etag, initial) per delivery; ``"synced"`` for the marker."""
    out: list[Seen] = []
    for item in items:
        if isinstance(item, Synced):
            out.append("synced")
            continue
        env = item.envelope
        resource = env.event.resource
        out.append((env.source_name, env.kind, env.key, resource.etag, item.initial))
    return out


async def pending(client: redis.asyncio.Redis, group: str, stream: str = FILES) -> int:
    summary: dict[str, Any] = await client.xpending(stream, group)
    return int(summary["pending"])


async def expect_sentinel(watch: RedisWatch, sink: RedisSink, key: str = "sentinel") -> None:
    """Publish one more event: it must be the next item (nothing else was waiting)."""
    await sink.publish("files", events([key]))
    [item] = await take(watch, 1)
    assert seen([item]) == [("files", "added", key, "e1", False)]
    await settle([item])


# -- list-then-watch --


async def test_a_list_longer_than_one_fetch(sink: RedisSink, open_watch: OpenWatch) -> None:
    keys = [f"k{i:04}" for i in range(700)]
    await sink.publish("files", events(keys))
    watch = open_watch()
    listed = await take(watch, len(keys) + 1)
    assert [s[2] for s in seen(listed[:-1]) if isinstance(s, tuple)] == keys
    assert listed[-1] == Synced(("files",))


async def test_trimmed_latest_entry_is_left_out_with_a_warning(
    sink: RedisSink,
    client: redis.asyncio.Redis,
    open_watch: OpenWatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await sink.publish("files", events(["gone", "kept"]))
    entry_id = await client.hget(items_key("files"), "gone")
    assert entry_id is not None
    await client.xdel(FILES, entry_id)  # as MAXLEN trimming would
    watch = open_watch()
    with caplog.at_level(logging.WARNING, logger="bridge.consumer.redis"):
        listed = await take(watch, 2)
    assert seen(listed) == [("files", "added", "kept", "e1", True), "synced"]
    assert "'gone'" in caplog.text
    assert "trimmed" in caplog.text


# -- consumer groups --


async def test_resume_redelivers_unacked_entries_only(
    sink: RedisSink, client: redis.asyncio.Redis, open_watch: OpenWatch
) -> None:
    await sink.publish("files", events(["listed"]))
    first = open_watch(group="ops", consumer="c1")
    assert len(await take(first, 2)) == 2  # the item and Synced
    await sink.publish("files", events(["d", "e", "f"]))
    live = await take(first, 3)
    assert [s[2] for s in seen(live) if isinstance(s, tuple)] == ["d", "e", "f"]
    await settle(live[:2])  # f is not acknowledged
    assert await pending(client, "ops") == 1
    await first.aclose()

    await sink.publish("files", events(["g"]))
    again = open_watch(group="ops", consumer="c1")
    items = await take(again, 3)
    assert seen(items) == [
        "synced",  # the group exists: not listed again
        ("files", "added", "f", "e1", False),
        ("files", "added", "g", "e1", False),
    ]
    await settle(items)
    assert await pending(client, "ops") == 0
    await expect_sentinel(again, sink)


async def test_a_consumer_that_dies_during_the_list_lists_again(
    sink: RedisSink, client: redis.asyncio.Redis, open_watch: OpenWatch
) -> None:
    await sink.publish("files", events(["a", "b", "c"]))
    first = open_watch(group="ops", consumer="c1")
    assert len(await take(first, 1)) == 1
    await first.aclose()
    assert await client.xinfo_groups(FILES) == []  # created only once the list is through

    again = open_watch(group="ops", consumer="c1")
    items = await take(again, 4)
    assert [s if s == "synced" else s[2] for s in seen(items)] == ["a", "b", "c", "synced"]
    await expect_sentinel(again, sink)


async def test_a_dead_consumers_pending_entries_are_claimed(
    sink: RedisSink, client: redis.asyncio.Redis, open_watch: OpenWatch
) -> None:
    dead = open_watch(group="ops", consumer="dead", list_first=False)
    assert await take(dead, 1) == [Synced(("files",), listed=False)]
    await sink.publish("files", events(["x", "y"]))
    assert len(await take(dead, 2)) == 2  # never acknowledged
    await dead.aclose()

    heir = open_watch(group="ops", consumer="heir", claim_idle_s=0)
    items = await take(heir, 3)
    assert seen(items) == [
        "synced",
        ("files", "added", "x", "e1", False),
        ("files", "added", "y", "e1", False),
    ]
    await settle(items)
    assert await pending(client, "ops") == 0
    consumers = {c["name"]: c["pending"] for c in await client.xinfo_consumers(FILES, "ops")}
    assert consumers == {b"dead": 0, b"heir": 0}


async def test_one_read_takes_at_most_batch_size_entries_of_the_group(
    sink: RedisSink, client: redis.asyncio.Redis, open_watch: OpenWatch
) -> None:
    keys = [f"k{i}" for i in range(10)]
    first = open_watch(group="ops", consumer="c1", list_first=False, batch_size=3)
    second = open_watch(group="ops", consumer="c2", list_first=False)
    for watch in (first, second):
        assert await take(watch, 1) == [Synced(("files",), listed=False)]
    await sink.publish("files", events(keys))
    got_first = await take(first, 3)  # one read of at most 3 entries
    got_second = await take(second, 7)  # the rest
    await settle(got_first + got_second)
    one = {s[2] for s in seen(got_first) if isinstance(s, tuple)}
    two = {s[2] for s in seen(got_second) if isinstance(s, tuple)}
    assert len(one) == 3
    assert one | two == set(keys)
    assert one & two == set()
    assert await pending(client, "ops") == 0


async def test_nak_delivers_again_and_stays_pending_until_acked(
    sink: RedisSink, client: redis.asyncio.Redis, open_watch: OpenWatch
) -> None:
    watch = open_watch(group="ops", consumer="c1", list_first=False)
    assert await take(watch, 1) == [Synced(("files",), listed=False)]
    await sink.publish("files", events(["a"]))
    [first] = await take(watch, 1)
    assert isinstance(first, Delivery)
    await first.nak()
    [again] = await take(watch, 1)
    assert isinstance(again, Delivery)
    assert again.envelope == first.envelope
    await again.nak(0.05)
    [third] = await take(watch, 1)  # claimed back once idle for the delay
    assert isinstance(third, Delivery)
    assert third.envelope == first.envelope
    await third.nak(60)
    assert await pending(client, "ops") == 1
    await watch.aclose()  # long before the delay is over: it is still pending in Redis

    resumed = open_watch(group="ops", consumer="c1")
    items = await take(resumed, 2)
    assert seen(items) == ["synced", ("files", "added", "a", "e1", False)]
    await settle(items)
    assert await pending(client, "ops") == 0
    await expect_sentinel(resumed, sink)


async def test_nak_without_a_group_delivers_again_from_this_process(
    sink: RedisSink, open_watch: OpenWatch
) -> None:
    await sink.publish("files", events(["a"]))
    watch = open_watch()
    [listed, synced] = await take(watch, 2)
    assert isinstance(listed, Delivery)
    await listed.nak(0.01)
    [again] = await take(watch, 1)
    assert seen([again]) == [("files", "added", "a", "e1", False)]
    assert isinstance(again, Delivery)
    assert again.envelope == listed.envelope
    assert synced == Synced(("files",))
    await expect_sentinel(watch, sink)


# -- decode errors --


def malformed(client: redis.asyncio.Redis) -> Any:
    return client.xadd(FILES, {"ce-id": "x", "data": "{not json"})


@pytest.mark.parametrize("group", GROUPS)
async def test_decode_errors_are_logged_and_skipped(
    sink: RedisSink,
    client: redis.asyncio.Redis,
    open_watch: OpenWatch,
    group: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await sink.publish("files", events(["a"]))
    bad_listed = await malformed(client)
    await client.hset(items_key("files"), "bad", bad_listed)
    watch = open_watch(group=group)
    with caplog.at_level(logging.WARNING, logger="bridge.consumer.redis"):
        listed = await take(watch, 2)
        assert seen(listed) == [("files", "added", "a", "e1", True), "synced"]
        await malformed(client)
        await client.xadd(FILES, {"unrelated": "entry"})
        await expect_sentinel(watch, sink)
    assert caplog.text.count("skipping entry") == 3
    if group is not None:
        assert await pending(client, group) == 0


async def test_decode_errors_can_be_raised(
    sink: RedisSink, client: redis.asyncio.Redis, open_watch: OpenWatch
) -> None:
    watch = open_watch(group="ops", on_decode_error="raise")
    assert await take(watch, 1) == [Synced(("files",))]
    bad = (await malformed(client)).decode()
    await sink.publish("files", events(["a"]))
    with pytest.raises(DecodeError, match=bad):
        await anext(watch)
    [item] = await take(watch, 1)  # the watch goes on
    assert seen([item]) == [("files", "added", "a", "e1", False)]
    await settle([item])
    assert await pending(client, "ops") == 1  # the bad one, left pending


# -- outages --


def keys(items: Sequence[WatchItem]) -> list[str]:
    """The item keys, ``initial:key`` for listed ones, and ``synced``."""
    return [s if isinstance(s, str) else f"initial:{s[2]}" if s[4] else s[2] for s in seen(items)]


async def read_an_entry_from_the_future(watch: RedisWatch, client: redis.asyncio.Redis) -> None:
    """Make the watch read an entry far in the future (a copy of the first one): after the
    stream is lost, the new entries' ids are below the last one it read."""
    [(_id, fields), *_] = await xrange(client, FILES)
    copy: dict[Any, Any] = dict(fields)
    await client.xadd(FILES, copy, id="99999999999999-0")
    [future] = await take(watch, 1)
    await settle([future])


@pytest.mark.parametrize("group", GROUPS)
async def test_lists_again_after_the_server_restarted_empty_during_a_read(
    redis_server: RedisServer,
    sink: RedisSink,
    client: redis.asyncio.Redis,
    open_watch: OpenWatch,
    group: str | None,
) -> None:
    await sink.publish("files", events(["a"]))
    watch = open_watch(group=group, retry_max_s=0.2)
    await settle(await take(watch, 2))
    blocked = asyncio.create_task(anext(watch))  # reading while the server goes away
    await asyncio.to_thread(redis_server.stop)
    await asyncio.to_thread(redis_server.start)
    async with asyncio.timeout(10):
        relisted = await blocked
    assert relisted == Synced(("files",))  # an empty list: "a" is gone
    await sink.publish("files", events(["after"]))
    [item] = await take(watch, 1)
    assert keys([item]) == ["after"]
    await settle([item])
    await expect_sentinel(watch, sink)
    if group is not None:
        assert await pending(client, group) == 0


@pytest.mark.parametrize("group", GROUPS)
async def test_lists_again_after_the_server_restarted_empty_between_reads(
    redis_server: RedisServer,
    sink: RedisSink,
    client: redis.asyncio.Redis,
    open_watch: OpenWatch,
    group: str | None,
) -> None:
    await sink.publish("files", events(["a"]))
    watch = open_watch(group=group)
    await settle(await take(watch, 2))
    await read_an_entry_from_the_future(watch, client)
    await asyncio.to_thread(redis_server.restart)
    await sink.publish("files", events(["b", "c"]))  # as the bridge would, its state lost too
    items = await take(watch, 3)
    assert keys(items) == ["initial:b", "initial:c", "synced"]
    await settle(items)
    await expect_sentinel(watch, sink)


@pytest.mark.parametrize("group", GROUPS)
async def test_lists_again_after_the_stream_was_deleted(
    sink: RedisSink,
    client: redis.asyncio.Redis,
    open_watch: OpenWatch,
    group: str | None,
) -> None:
    await sink.publish("files", events(["a"]))
    watch = open_watch(group=group, block_s=0.1)
    await settle(await take(watch, 2))
    await read_an_entry_from_the_future(watch, client)
    await client.delete(FILES, items_key("files"))  # connected all along: no error to notice
    await sink.publish("files", events(["b"]))
    items = await take(watch, 2)
    assert keys(items) == ["initial:b", "synced"]
    await settle(items)
    await expect_sentinel(watch, sink)


@pytest.mark.parametrize("group", GROUPS)
async def test_without_list_first_a_lost_stream_is_read_from_its_start(
    redis_server: RedisServer,
    sink: RedisSink,
    client: redis.asyncio.Redis,
    open_watch: OpenWatch,
    group: str | None,
) -> None:
    await sink.publish("files", events(["a"]))
    watch = open_watch(group=group, list_first=False)
    assert await take(watch, 1) == [Synced(("files",), listed=False)]
    await read_an_entry_from_the_future(watch, client)
    await asyncio.to_thread(redis_server.restart)
    await sink.publish("files", events(["b", "c"]))
    items = await take(watch, 2)
    assert keys(items) == ["b", "c"]
    await settle(items)
    await expect_sentinel(watch, sink)


@pytest.mark.parametrize("list_first", [True, False])
async def test_a_destroyed_group_is_created_again(
    sink: RedisSink, client: redis.asyncio.Redis, open_watch: OpenWatch, list_first: bool
) -> None:
    await sink.publish("files", events(["a"]))
    watch = open_watch(group="ops", list_first=list_first)
    await settle(await take(watch, 2 if list_first else 1))
    await client.xgroup_destroy(FILES, "ops")
    await sink.publish("files", events(["b"]))
    if list_first:
        items = await take(watch, 3)
        assert keys(items) == ["initial:a", "initial:b", "synced"]
    else:  # where the watch was: not "a" again
        items = await take(watch, 1)
        assert keys(items) == ["b"]
    await settle(items)
    await expect_sentinel(watch, sink)


# -- the object --


async def test_closing_ends_the_iteration_and_leaves_a_passed_client_open(
    client: redis.asyncio.Redis, sink: RedisSink
) -> None:
    await sink.publish("files", events(["a"]))
    async with watch_redis(client, ["files"]) as watch:
        [item] = await take(watch, 1)
        assert seen([item]) == [("files", "added", "a", "e1", True)]
    with pytest.raises(StopAsyncIteration):
        await anext(watch)
    assert await client.ping()


async def test_closing_ends_a_blocked_iteration(
    client: redis.asyncio.Redis, open_watch: OpenWatch
) -> None:
    watch = open_watch(group="ops", list_first=False, block_s=60)
    assert await take(watch, 1) == [Synced(("files",), listed=False)]
    blocked = asyncio.create_task(anext(watch))

    async def read_blocked() -> None:  # polled until the server reports the read blocked
        while True:
            if any(c["cmd"] == "xreadgroup" for c in await client.client_list()):
                return
            await asyncio.sleep(0.01)

    await asyncio.wait_for(read_blocked(), 10)
    await watch.aclose()
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(10):  # well before block_s
            await blocked


@pytest.mark.parametrize(
    ("sources", "options", "message"),
    [
        ([], {}, "at least one source"),
        (["no.dots"], {}, "source name"),
        (["files"], {"on_decode_error": "ignore"}, "on_decode_error"),
        (["files"], {"batch_size": 0}, "batch_size"),
        (["files"], {"claim_idle_s": -1}, "claim_idle_s"),
        (["files"], {"max_deliveries": 0}, "max_deliveries"),
        (["files"], {"prune_idle_s": -1}, "prune_idle_s"),
    ],
)
def test_invalid_configuration(sources: list[str], options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        watch_redis("redis://127.0.0.1:1/0", sources, **options)


async def test_one_cancel_stops_a_handler_right_after_it_handled(
    sink: RedisSink, redis_url: str
) -> None:
    """redis-py's writes run under asyncio.wait_for, which on Python 3.11 can drop a
    cancellation that arrives as the write completes: one cancel() must still stop the task."""
    from bridge.consumer import event_handler, run_handler

    await sink.publish("files", events(["a"]))
    for attempt in range(3):
        handled = asyncio.Event()

        async def handle(
            kind: Any, resource: Any, state: None, handled: asyncio.Event = handled
        ) -> None:
            handled.set()

        watch = watch_redis(redis_url, ("files",), group=f"cancel-{attempt}")
        task = asyncio.create_task(run_handler(event_handler(None)(handle), watch))
        try:
            await handled.wait()
            task.cancel()  # lands while the watch creates its group (XGROUP CREATE)
            done, _ = await asyncio.wait([task], timeout=10)
            assert done, "the task ignored its cancellation"
            assert task.cancelled()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await watch.aclose()


async def test_a_dead_consumer_is_pruned_once_its_entries_are_claimed(
    sink: RedisSink, open_watch: OpenWatch, client: redis.asyncio.Redis
) -> None:
    dead = open_watch(group="ops", consumer="dead", list_first=False)
    assert await take(dead, 1) == [Synced(("files",), listed=False)]
    await sink.publish("files", events(["a"]))
    [got] = await take(dead, 1)  # delivered, never acknowledged: it "died"
    assert isinstance(got, Delivery)
    await dead.aclose()

    live = open_watch(group="ops", consumer="live", claim_idle_s=0.05, prune_idle_s=0)
    claimed = await take(live, 2)
    assert claimed[0] == Synced(("files",), listed=False)
    assert isinstance(claimed[1], Delivery)
    assert claimed[1].envelope.id == got.envelope.id
    assert claimed[1].attempt == 2  # the group's delivery count
    await settle(claimed)

    async def names() -> set[str]:
        consumers = await client.xinfo_consumers(FILES, "ops")
        return {c["name"].decode() for c in consumers}

    async def consume() -> None:
        async for item in live:
            await settle([item])

    task = asyncio.create_task(consume())
    try:
        await until(lambda: _only_live(names), "the dead consumer pruned")
    finally:
        await live.aclose()
        async with asyncio.timeout(10):
            await task
    assert await pending(client, "ops") == 0


async def _only_live(names: Callable[[], Awaitable[set[str]]]) -> bool:
    return await names() == {"live"}


async def test_a_stream_emptied_and_written_again_between_reads_is_listed_again(
    sink: RedisSink, open_watch: OpenWatch, client: redis.asyncio.Redis
) -> None:
    """Without a group, entry ids say nothing (the new entries' ids are later): the count of
    entries ever added, below what the watch read, tells the stream was created again."""
    await sink.publish("files", events(["a", "b"]))
    watch = open_watch()
    assert len(await take(watch, 3)) == 3  # a, b, Synced
    await client.flushall()  # as a restart without persistence would
    await sink.publish("files", events(["c"]))
    items = await take(watch, 2)
    assert seen(items) == [("files", "added", "c", "e1", True), "synced"]
    assert items[1] == Synced(("files",), listed=True)  # a Reflector drops a and b
    await expect_sentinel(watch, sink)
