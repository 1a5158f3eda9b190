"""The broker as the fallback checkpoint (bridge.state.recovery), on real NATS and Redis.

Each "restart" is a new source object, a new in-memory state store and a new sink (the same
broker): everything the bridge process would have in memory is gone, only the broker remains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis

from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.errors import PublishError
from bridge.events import Added
from bridge.service.delivery import SourceLoop, SourceSpec
from bridge.sinks import Sink
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.nats_recovery import limit_warnings
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.http import HttpPoller
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import MemoryStore
from bridge.state import MemoryStateStore
from bridge.state.recovery import UNKNOWN_VERSION, Published
from bridge.watching import WatchConfig
from tests.support.events import content_mode, nats_test_config

SOURCE = "files"
BROKERS = [
    pytest.param(("nats", "binary"), id="nats-binary"),
    pytest.param(("nats", "structured"), id="nats-structured"),
    pytest.param(("redis", "binary"), id="redis-binary"),
    pytest.param(("redis", "structured"), id="redis-structured"),
]


@dataclass
class Broker:
    """Makes a new sink for every start of the bridge, all on the same stream."""

    kind: str
    make: Any

    def sink(self) -> Sink:
        sink: Sink = self.make()
        return sink


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Broker:
    kind, mode = request.param
    if kind == "nats":
        url = request.getfixturevalue("nats_url")
        config = nats_test_config(url, content_mode=content_mode(mode))
        return Broker(kind, lambda: NatsSink(config))
    url = request.getfixturevalue("redis_url")
    redis_config = RedisSinkConfig(url=url, content_mode=content_mode(mode), timeout_s=5.0)
    return Broker(kind, lambda: RedisSink(redis_config))


class RefusingSink:
    """A sink that records what it was given and refuses it (the broker lost the publish)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.offered: list[CloudEvent] = []

    @property
    def description(self) -> str:
        return self.inner.description

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        self.offered += events
        raise PublishError("refused by the test")

    async def read_published(self, source_name: str) -> Published:
        reader: Any = self.inner
        result: Published = await reader.read_published(source_name)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Run:
    """One start of the bridge for one source: what it published."""

    loop: SourceLoop
    published: list[CloudEvent] = field(default_factory=list)

    def seen(self) -> list[tuple[str, str]]:
        return [(e.type.split(".")[3], e.subject) for e in self.published]


@contextlib.asynccontextmanager
async def started(store: MemoryStore, sink: Sink, *, max_batch: int = 1000) -> AsyncIterator[Run]:
    """A fresh process: new poller, new in-memory state, the given sink; restored."""
    poller = ObjectStorePoller(store).with_name(SOURCE)
    spec = SourceSpec(
        name=SOURCE,
        source=poller,
        watch=WatchConfig(0.01),
        source_uri="memory://test",
        max_batch_events=max_batch,
    )
    run: Run | None = None

    async def on_published(_name: str, events: Sequence[CloudEvent]) -> None:
        assert run is not None
        run.published += events

    loop = SourceLoop(spec, sink, MemoryStateStore(), on_published=on_published)
    run = Run(loop)
    try:
        await sink.connect()
        await loop.restore()
        yield run
    finally:
        await sink.aclose()


async def step_ok(run: Run) -> None:
    error = await run.loop.step()
    assert error is None, error


async def test_restart_without_a_state_store_publishes_nothing_for_unchanged_items(
    broker: Broker,
) -> None:
    store = MemoryStore()
    for name in ("a", "b", "c"):
        await store.put(f"cfg/{name}.yaml", name.encode())
    async with started(store, broker.sink()) as first:
        await step_ok(first)
        await step_ok(first)
    assert sorted(first.seen()) == [("added", f"cfg/{n}.yaml") for n in "abc"]

    async with started(store, broker.sink()) as second:
        assert second.loop.revision == first.loop.revision
        await step_ok(second)
        await step_ok(second)
    assert second.published == []


async def test_changes_made_while_stopped_arrive_once_with_stable_ids(broker: Broker) -> None:
    store = MemoryStore()
    for name in ("a", "b", "c"):
        await store.put(name, name.encode())
    async with started(store, broker.sink()) as first:
        await step_ok(first)
    # stopped: b changes, c goes, d comes
    await store.put("b", b"b2")
    await store.delete("c")
    await store.put("d", b"d")

    async with started(store, RefusingSink(broker.sink())) as refused:
        assert await refused.loop.step() is not None
    offered = refused.loop.sink.offered  # type: ignore[attr-defined]
    assert sorted((e.type.split(".")[3], e.subject) for e in offered) == [
        ("added", "d"),
        ("modified", "b"),
        ("removed", "c"),
    ]

    async with started(store, broker.sink()) as second:
        await step_ok(second)
        await step_ok(second)
    assert [e.id for e in second.published] == [e.id for e in offered], "ids changed"

    async with started(store, broker.sink()) as third:
        await step_ok(third)
    assert third.published == [], "published again after a restart"


async def test_a_recreated_item_gets_a_new_id(broker: Broker) -> None:
    store = MemoryStore()
    await store.put("x", b"same")
    async with started(store, broker.sink()) as first:
        await step_ok(first)
    await store.delete("x")
    async with started(store, broker.sink()) as second:
        await step_ok(second)
    assert second.seen() == [("removed", "x")]
    await store.put("x", b"same")  # the same content, so the same ETag
    async with started(store, broker.sink()) as third:
        await step_ok(third)
    assert third.seen() == [("added", "x")]
    assert third.published[0].id != first.published[0].id


async def test_a_changeset_in_batches_interrupted_is_finished_once(broker: Broker) -> None:
    """A changeset of 3 batches whose second publish failed: the restart publishes only what
    the broker lacks."""
    store = MemoryStore()
    for i in range(6):
        await store.put(f"k{i}", b"v")
    async with started(store, broker.sink(), max_batch=2) as first:
        await step_ok(first)
    assert len(first.published) == 6
    for i in range(6):
        await store.put(f"k{i}", b"w")
    flaky = FailsAfter(broker.sink(), batches=1)
    async with started(store, flaky, max_batch=2) as second:
        assert await second.loop.step() is not None
    assert len(second.published) == 2
    async with started(store, broker.sink(), max_batch=2) as third:
        await step_ok(third)
    assert sorted(e.subject for e in third.published) == [f"k{i}" for i in range(2, 6)]
    assert not {e.id for e in third.published} & {e.id for e in second.published}


class FailsAfter(RefusingSink):
    """Publishes ``batches`` batches, then refuses."""

    def __init__(self, inner: Sink, *, batches: int) -> None:
        super().__init__(inner)
        self.left = batches

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        if self.left <= 0:
            raise PublishError("refused by the test")
        self.left -= 1
        await self.inner.publish(source_name, events)


async def test_nothing_published_yet_starts_a_new_lineage(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore()
    await store.put("a", b"a")
    caplog.set_level(logging.INFO, "bridge.recovery")
    async with started(store, broker.sink()) as first:
        await step_ok(first)
    assert first.seen() == [("added", "a")]
    assert "nothing published yet" in caplog.text


async def test_items_the_stream_limits_dropped_are_announced_again_once(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream lost the last events of a and b, unchanged since they were added (NATS: a
    stream created with max_msgs 6; Redis: trimmed to 6 entries, as MAXLEN does to
    long-unchanged items): recovery warns, and the next poll announces a and b again, once."""
    store = MemoryStore()
    keys = ["a", "b", "c", "d", "e"]
    for key in keys:
        await store.put(key, key.encode())
    sink = broker.sink()
    if isinstance(sink, NatsSink):
        await limited_stream(sink, max_msgs=6)
    async with started(store, sink) as first:
        await step_ok(first)
        for key in ("c", "d", "e"):
            await store.put(key, b"2")
        await step_ok(first)
    assert [e.subject for e in first.published] == [*keys, "c", "d", "e"]
    if broker.kind == "redis":  # 8 entries, 6 kept: those of a and b go
        assert isinstance(sink, RedisSink)
        client = aioredis.from_url(sink.config.url)
        try:
            await client.xtrim(f"koprs:external:{SOURCE}", maxlen=6, approximate=False)
        finally:
            await client.aclose()

    caplog.set_level(logging.INFO, "bridge.recovery")
    sink = broker.sink()
    if isinstance(sink, RedisSink):
        sink.config = dataclasses.replace(sink.config, maxlen=4)
    async with started(store, sink) as second:
        await step_ok(second)
        await step_ok(second)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "may be partial" in w and ("max_msgs 6" in w or "maxlen is 4" in w) for w in warnings
    )
    if broker.kind == "redis":  # the items hash still names them: announced as changed
        assert any("2 live items could not be read" in w for w in warnings), warnings
        assert second.seen() == [("modified", "a"), ("modified", "b")]
    else:  # no message left at all: consumers do not have them either
        assert second.seen() == [("added", "a"), ("added", "b")]

    async with started(store, broker.sink()) as third:
        await step_ok(third)
    assert third.published == []


async def limited_stream(sink: NatsSink, *, max_msgs: int) -> None:
    """Create the sink's stream beforehand, as an administrator would, with ``max_msgs``."""
    nc = await nats.connect(sink.config.url)
    try:
        js = nc.jetstream()
        stream = sink.config.stream_config()
        stream.max_msgs = max_msgs
        await js.add_stream(stream)
    finally:
        await nc.close()


def test_stream_limits_that_make_recovery_partial_are_named() -> None:
    config = NatsSinkConfig(url="nats://127.0.0.1:1", stream="S").stream_config()
    assert limit_warnings(config) == []  # the sink's defaults keep every item's last message
    config.max_age = 3600.0
    config.max_bytes = 1 << 30
    config.max_msgs = 1000
    warnings = limit_warnings(config)
    assert len(warnings) == 3
    assert "max_age 3600 s" in warnings[0]
    assert "max_msgs 1000" in warnings[1]
    assert "max_bytes 1073741824" in warnings[2]


async def test_events_of_a_version_without_the_headers_are_announced_again_once(
    broker: Broker,
) -> None:
    """Messages published before the koprs-* headers existed: their items are live with an
    unknown version, so the first poll announces each once (Modified, or Removed if gone)."""
    store = MemoryStore()
    for key in ("a", "b"):
        await store.put(key, key.encode())
    sink = broker.sink()
    encoder = EventEncoder(SOURCE, "memory://test")
    listed = [obj for page in [p async for p in store.list()] for obj in page]
    old = [dataclasses.replace(e, revision=None) for e in encoder.encode_all(map(Added, listed), 7)]
    await sink.connect()
    try:
        await sink.publish(SOURCE, old)
    finally:
        await sink.aclose()
    await store.delete("b")
    async with started(store, broker.sink()) as first:
        await step_ok(first)
    assert first.seen() == [("modified", "a"), ("removed", "b")]
    assert {e.id for e in first.published}.isdisjoint(e.id for e in old)
    async with started(store, broker.sink()) as second:
        await step_ok(second)
    assert second.published == []


def test_an_http_source_recovers_its_digest() -> None:
    poller = HttpPoller("http://127.0.0.1:1/doc")
    digest = "ab" * 32
    assert poller.state_from_published({poller.url: f"sha256:{digest}"}) == {
        "digest": digest,
        "status": "200",
    }
    assert poller.state_from_published({"http://elsewhere/": f"sha256:{digest}"}) == {}
    # an unknown version matches no body and still makes a valid Removed (digest pattern)
    assert poller.state_from_published({poller.url: UNKNOWN_VERSION})["digest"] == "0" * 64
