"""NatsWatch against the real nats-server: list-then-watch, resume, fan-out, outages, errors.

Events are published with :class:`NatsSink` (what the bridge uses) for precise control; every
test has a stream and subject prefix of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.js
import nats.js.api
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from bridge.cloudevents import CloudEvent
from bridge.consumer import NatsWatch, UnknownEventTypeError, watch_nats
from bridge.consumer.base import Delivery, Synced, WatchItem
from bridge.consumer.nats import NatsWatchConfig
from bridge.errors import ConfigError, DecodeError, PublishError
from bridge.events import Added, Modified, Removed
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from tests.support.events import nats_test_config, object_events
from tests.support.replicas import until
from tests.support.servers import NatsServer

# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def config(nats_url: str) -> NatsSinkConfig:
    return nats_test_config(nats_url)


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.05)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.fixture
async def sink(config: NatsSinkConfig, js: nats.js.JetStreamContext) -> AsyncIterator[NatsSink]:
    made = NatsSink(config)
    await made.connect()
    try:
        yield made
    finally:
        await made.aclose()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(config.stream)


def watch(config: NatsSinkConfig, **options: Any) -> NatsWatch:
    """A watch of source ``files`` of the test's stream, quick to notice an outage."""
    settings: dict[str, Any] = {
        "stream": config.stream,
        "subject_prefix": config.subject_prefix,
        "fetch_timeout_s": 0.5,
        "request_timeout_s": 2.0,
        "reconnect_wait_s": 0.05,
        "retry_max_s": 0.2,
    }
    settings.update(options)
    return watch_nats(config.url, ["files"], **settings)


class Events:
    """Events of source ``files``, each with a revision of its own (so a unique id)."""

    def __init__(self) -> None:
        self.revision = 0
        self.published: list[CloudEvent] = []

    def make(self, kind: type[Any], keys: Sequence[str], etag: str = "e1") -> list[CloudEvent]:
        self.revision += 1
        return object_events(keys, kind=kind, revision=self.revision, etag=etag)

    async def publish(self, sink: NatsSink, events: list[CloudEvent]) -> list[CloudEvent]:
        await sink.publish("files", events)
        self.published += events
        return events


async def publish_retrying(sink: NatsSink, events: list[CloudEvent]) -> None:
    """Publish once the server is back (the sink fails while it reconnects)."""
    async with asyncio.timeout(30):
        while True:
            try:
                await sink.publish("files", events)
                return
            except PublishError:
                await asyncio.sleep(0.05)


@dataclass
class Seen:
    """What a watch yielded, in order."""

    items: list[WatchItem] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, item: WatchItem) -> None:
        self.items.append(item)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    @property
    def deliveries(self) -> list[Delivery]:
        return [i for i in self.items if isinstance(i, Delivery)]

    @property
    def ids(self) -> list[str]:
        return [d.envelope.id for d in self.deliveries]

    @property
    def synced(self) -> int:
        return sum(isinstance(i, Synced) for i in self.items)

    async def wait_for(self, predicate: Callable[[Seen], bool]) -> None:
        async with asyncio.timeout(30):
            while not predicate(self):
                await self.changed.wait()


def summary(item: WatchItem) -> tuple[str, str, bool] | str:
    if isinstance(item, Synced):
        return "synced"
    return (item.envelope.type.split(".")[-2], item.envelope.key, item.initial)


@contextlib.asynccontextmanager
async def collecting(
    w: NatsWatch, *, ack: Callable[[Delivery], bool] = lambda _: True
) -> AsyncIterator[Seen]:
    """Iterate ``w`` in a task, acknowledging each delivery ``ack`` accepts before recording it."""
    seen = Seen()

    async def consume() -> None:
        async for item in w:
            if isinstance(item, Delivery) and ack(item):
                await item.ack()
            seen.add(item)

    task = asyncio.create_task(consume())
    try:
        yield seen
    finally:
        await w.aclose()
        async with asyncio.timeout(10):
            await task


async def next_item(it: AsyncIterator[WatchItem]) -> WatchItem:
    async with asyncio.timeout(30):
        return await anext(it)


# -- list, then watch -------------------------------------------------------------------------


async def test_other_sources_are_not_watched(sink: NatsSink, config: NatsSinkConfig) -> None:
    await sink.publish("other", object_events(["x"], source_name="other"))
    await sink.publish("files", object_events(["a"]))
    async with collecting(watch(config)) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
        await sink.publish("other", object_events(["y"], source_name="other", revision=2))
        await sink.publish("files", object_events(["b"], revision=2))
        await seen.wait_for(lambda s: len(s.deliveries) == 2)
    assert [summary(i) for i in seen.items] == [
        ("added", "a", True),
        "synced",
        ("added", "b", False),
    ]


async def test_all_sources_without_a_source_list(sink: NatsSink, config: NatsSinkConfig) -> None:
    await sink.publish("other", object_events(["x"], source_name="other"))
    await sink.publish("files", object_events(["a"]))
    w = watch_nats(
        config.url, stream=config.stream, subject_prefix=config.subject_prefix, fetch_timeout_s=0.5
    )
    async with collecting(w) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
    assert sorted((d.envelope.source_name, d.envelope.key) for d in seen.deliveries) == [
        ("files", "a"),
        ("other", "x"),
    ]
    assert seen.items[-1] == Synced(())


def no_gap_no_duplicate(published: list[CloudEvent], seen: Seen) -> int:
    """Check the watch against the published history; return the list's snapshot point S.

    The list must be the state after the first S events (latest event of each item not
    removed), and the live deliveries exactly the events after S, in order.
    """
    assert len(set(seen.ids)) == len(seen.ids), "an event was delivered twice"
    kinds = [summary(i) for i in seen.items]
    assert kinds.count("synced") == 1
    cut = kinds.index("synced")
    assert all(k[2] for k in kinds[:cut] if k != "synced"), "a live change before Synced"
    assert not any(k[2] for k in kinds[cut + 1 :] if k != "synced"), "an initial item after"
    live = [d.envelope.id for d in seen.deliveries if not d.initial]
    snapshot = len(published) - len(live)
    assert live == [e.id for e in published[snapshot:]], "a gap or a reordering in the live part"
    state: dict[str, CloudEvent] = {}
    for event in published[:snapshot]:
        state[event.subject] = event
    expected = {k: e.id for k, e in state.items() if not e.type.endswith(".removed.v1")}
    listed = {d.envelope.key: d.envelope.id for d in seen.deliveries if d.initial}
    assert listed == expected, f"the list is not the state after {snapshot} events"
    return snapshot


@pytest.mark.parametrize("durable", [None, "ops"])
async def test_a_consumer_behind_the_stream_leader_does_not_end_the_list_early(
    sink: NatsSink,
    config: NatsSinkConfig,
    durable: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster the list's consumer may live on a replica that has not yet stored the
    latest messages: it reports nothing pending when it is made. The list still holds every
    item published before the watch began (here the lagging replica's answer is simulated)."""
    ev = Events()
    a, b = await ev.publish(sink, ev.make(Added, ["a", "b"]))
    made = nats.js.JetStreamContext.add_consumer

    async def behind(js: nats.js.JetStreamContext, *args: Any, **kwargs: Any) -> Any:
        info = await made(js, *args, **kwargs)
        info.num_pending = 0  # what a replica without these messages yet says
        return info

    monkeypatch.setattr(nats.js.JetStreamContext, "add_consumer", behind)
    async with collecting(watch(config, durable=durable)) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
    assert [summary(i) for i in seen.items] == [
        ("added", "a", True),
        ("added", "b", True),
        "synced",
    ]
    assert seen.ids == [a.id, b.id]


async def test_changes_during_the_list_are_neither_lost_nor_doubled(
    sink: NatsSink, config: NatsSinkConfig
) -> None:
    ev = Events()
    keys = [f"k{i:03d}" for i in range(60)]
    await ev.publish(sink, ev.make(Added, keys))
    before = len(ev.published)
    w = watch(config, batch_size=5)  # the list takes a dozen pulls
    it = aiter(w)
    seen = Seen()
    try:
        first = await next_item(it)
        assert isinstance(first, Delivery)
        assert first.initial
        seen.add(first)
        # the consumer exists (its snapshot is taken), most of the list is still on the server
        await ev.publish(sink, ev.make(Added, ["new1"]))  # new: becomes part of the list
        await ev.publish(sink, ev.make(Modified, ["k000"], etag="e2"))  # listed already
        await ev.publish(sink, ev.make(Modified, ["k059", "k058"], etag="e2"))  # not yet
        await ev.publish(sink, ev.make(Removed, ["k057", "k001"]))
        await ev.publish(sink, ev.make(Added, ["new2"]))
        await ev.publish(sink, ev.make(Modified, ["new1"], etag="e2"))
        total = len(ev.published)
        while len(seen.deliveries) < 60 + 1 + (total - before - 1) or not seen.synced:
            item = await next_item(it)
            if isinstance(item, Delivery):
                await item.ack()
            seen.add(item)
    finally:
        await w.aclose()
    snapshot = no_gap_no_duplicate(ev.published, seen)
    assert snapshot == before + 1  # the list ended at the first item seen twice
    assert ("added", "new1", True) in [summary(i) for i in seen.items]


async def test_many_changes_during_a_slow_list(sink: NatsSink, config: NatsSinkConfig) -> None:
    """The list is read one message per pull while items change, and go, meanwhile."""
    ev = Events()
    keys = [f"k{i:02d}" for i in range(20)]
    await ev.publish(sink, ev.make(Added, keys))
    w = watch(config, batch_size=1)
    it = aiter(w)
    seen = Seen()

    def caught_up() -> bool:
        live = [d for d in seen.deliveries if not d.initial]
        return bool(seen.synced and live and live[-1].envelope.id == ev.published[-1].id)

    try:
        for round_number, key in enumerate(keys):
            item = await next_item(it)
            seen.add(item)
            if isinstance(item, Delivery):
                await item.ack()
            kind = Removed if round_number % 3 == 0 else Modified
            await ev.publish(sink, ev.make(kind, [key, keys[-1 - round_number]], etag="e2"))
        while not caught_up():
            item = await next_item(it)
            seen.add(item)
            if isinstance(item, Delivery):
                await item.ack()
    finally:
        await w.aclose()
    no_gap_no_duplicate(ev.published, seen)


# -- durable consumers ------------------------------------------------------------------------


async def test_durable_resumes_without_acked_events_and_with_unacked_ones(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    ev = Events()
    first = await ev.publish(sink, ev.make(Added, ["a", "b", "c"]))
    unacked = first[2].id
    w1 = watch(config, durable="ops", ack_wait_s=1.0)
    async with collecting(w1, ack=lambda d: d.envelope.id != unacked) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
    assert [summary(i) for i in seen.items] == [
        ("added", "a", True),
        ("added", "b", True),
        ("added", "c", True),
        "synced",
    ]
    later = await ev.publish(sink, ev.make(Added, ["d"]))
    later += await ev.publish(sink, ev.make(Modified, ["b"], etag="e2"))
    async with collecting(watch(config, durable="ops", ack_wait_s=1.0)) as again:
        await again.wait_for(lambda s: len(s.deliveries) == 3)
    assert again.items[0] == Synced(("files",), listed=False)  # resumed: no list
    assert Counter(again.ids) == Counter([unacked, *(e.id for e in later)])
    assert not any(d.initial for d in again.deliveries)
    info = await js.consumer_info(config.stream, "ops")
    assert info.num_pending == 0
    assert info.num_ack_pending == 0


@pytest.mark.parametrize("durable", [None, "ops"])
async def test_an_acknowledgement_the_server_lost_is_not_a_second_delivery(
    sink: NatsSink,
    config: NatsSinkConfig,
    js: nats.js.JetStreamContext,
    durable: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer's leader that dies before storing an acknowledgement (a node killed, a stream
    leader change) has the server deliver the message again: the watch settled it already, so
    it acknowledges it again instead of delivering it twice."""
    ev = Events()
    (a,) = await ev.publish(sink, ev.make(Added, ["a"]))
    lost: list[int] = []
    confirmed = Msg.ack_sync

    async def lose_the_first(msg: Msg, **options: Any) -> Msg:
        if not lost:
            lost.append(msg.metadata.sequence.stream)
            return msg  # "confirmed", but the server never heard of it
        return await confirmed(msg, **options)

    monkeypatch.setattr(Msg, "ack_sync", lose_the_first)
    w = watch(config, durable=durable, ack_wait_s=0.5)

    async def redelivered_and_settled() -> bool:
        assert w.consumer_name is not None
        info = await js.consumer_info(config.stream, w.consumer_name)
        # delivered twice (consumer sequence 2), and settled
        return bool(info.delivered.consumer_seq >= 2 and info.num_ack_pending == 0)

    async with collecting(w) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
        await until(redelivered_and_settled, "the server to deliver message 1 again")
        b = await ev.publish(sink, ev.make(Added, ["b"]))
        await seen.wait_for(lambda s: b[0].id in s.ids)
    assert lost == [1]
    assert seen.ids == [a.id, b[0].id]


async def test_durable_created_fresh_lists(sink: NatsSink, config: NatsSinkConfig) -> None:
    ev = Events()
    await ev.publish(sink, ev.make(Added, ["a"]))
    async with collecting(watch(config, durable="fresh")) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
    assert [summary(i) for i in seen.items] == [("added", "a", True), "synced"]


async def test_durable_with_other_sources_is_refused(
    sink: NatsSink, config: NatsSinkConfig
) -> None:
    async with collecting(watch(config, durable="ops")) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
    w = watch_nats(
        config.url, ["files", "web"], durable="ops", stream=config.stream,
        subject_prefix=config.subject_prefix,
    )  # fmt: skip
    async with w:
        with pytest.raises(ConfigError, match="filters"):
            await next_item(aiter(w))


# -- outages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("durable", [None, "ops"])
async def test_recovers_after_a_server_restart(
    durable: str | None, nats_server: NatsServer, sink: NatsSink, config: NatsSinkConfig
) -> None:
    """Nothing lost, nothing settled delivered again, no second list; the unsettled comes again."""
    ev = Events()
    a, b = await ev.publish(sink, ev.make(Added, ["a", "b"]))
    held = a.id  # not acknowledged the first time; b is
    acked_once: set[str] = set()

    def ack(delivery: Delivery) -> bool:
        if delivery.envelope.id == held and held not in acked_once:
            acked_once.add(held)
            return False
        return True

    async with collecting(watch(config, durable=durable, ack_wait_s=1.0), ack=ack) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
        nats_server.stop()
        nats_server.start()
        c = ev.make(Added, ["c"])
        await publish_retrying(sink, c)
        await seen.wait_for(lambda s: c[0].id in s.ids)
        d = ev.make(Modified, ["a"], etag="e2")
        await publish_retrying(sink, d)
        await seen.wait_for(lambda s: d[0].id in s.ids and s.ids.count(held) == 2)
    assert seen.synced == 1
    assert Counter(seen.ids) == Counter([a.id, a.id, b.id, c[0].id, d[0].id])
    assert [summary(i) for i in seen.items][:3] == [
        ("added", "a", True),
        ("added", "b", True),
        "synced",
    ]


async def test_ephemeral_consumer_is_recreated_after_a_reconnection(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    """The server does not keep an ephemeral consumer's position over a restart: after any
    reconnection the watch makes a new one where it was (here the reconnection is simulated)."""
    ev = Events()
    a, b = await ev.publish(sink, ev.make(Added, ["a", "b"]))
    w = watch(config)
    it = aiter(w)
    try:
        first = [await next_item(it) for _ in range(3)]
        assert [summary(i) for i in first] == [("added", "a", True), ("added", "b", True), "synced"]
        held = first[0]
        assert isinstance(first[1], Delivery)
        await first[1].ack()
        old = w.consumer_name
        assert old is not None
        assert w._nc is not None
        w._nc.stats["reconnects"] += 1  # as the client counts a reconnection
        c = await ev.publish(sink, ev.make(Added, ["c"]))
        after = [await next_item(it) for _ in range(2)]
        assert w.consumer_name != old
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(config.stream, old)
    finally:
        await w.aclose()
    assert isinstance(held, Delivery)
    # a, not settled, comes again; b, acknowledged, does not; no second list
    assert [(summary(i), i.envelope.id) for i in after if isinstance(i, Delivery)] == [
        (("added", "a", False), a.id),
        (("added", "c", False), c[0].id),
    ]
    assert b.id not in [i.envelope.id for i in after if isinstance(i, Delivery)]


async def test_consumer_lost_during_the_list_goes_on_from_where_it_was(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    ev = Events()
    keys = [f"k{i:02d}" for i in range(30)]
    await ev.publish(sink, ev.make(Added, keys))
    w = watch(config, batch_size=1)  # nothing pulled that the test has not seen and acknowledged
    it = aiter(w)
    seen = Seen()
    try:
        for _ in range(3):
            item = await next_item(it)
            seen.add(item)
            assert isinstance(item, Delivery)
            await item.ack()
        assert w.consumer_name is not None
        await js.delete_consumer(config.stream, w.consumer_name)
        await ev.publish(sink, ev.make(Modified, ["k00", "k29", "k28"], etag="e2"))
        await ev.publish(sink, ev.make(Removed, ["k27", "k01"]))
        await ev.publish(sink, ev.make(Added, ["new"]))
        while not (seen.synced and seen.ids and seen.ids[-1] == ev.published[-1].id):
            item = await next_item(it)
            seen.add(item)
            if isinstance(item, Delivery):
                await item.ack()
    finally:
        await w.aclose()
    assert seen.synced == 1
    assert len(set(seen.ids)) == len(seen.ids), "an event was delivered twice"
    state: dict[str, str] = {}
    for delivery in seen.deliveries:  # as a cache applies them
        if delivery.envelope.kind == "removed":
            state.pop(delivery.envelope.key, None)
        else:
            state[delivery.envelope.key] = delivery.envelope.id
    truth: dict[str, CloudEvent] = {}
    for event in ev.published:
        truth[event.subject] = event
    assert state == {k: e.id for k, e in truth.items() if not e.type.endswith(".removed.v1")}
    initial = [d for d in seen.deliveries if d.initial]
    assert len({d.envelope.key for d in initial}) == len(initial)


async def test_server_down_at_start(
    nats_server: NatsServer, nats_url: str, config: NatsSinkConfig
) -> None:
    nats_server.stop()
    event = object_events(["a"])
    sink = NatsSink(config)
    try:
        async with collecting(watch(config)) as seen:
            nats_server.start()
            await publish_retrying(sink, event)
            await seen.wait_for(lambda s: s.synced == 1 and len(s.deliveries) == 1)
    finally:
        await sink.aclose()
        nc = await nats.connect(nats_url)
        await nc.jetstream().delete_stream(config.stream)
        await nc.close()
    assert seen.ids == [event[0].id]
    assert seen.synced == 1


async def test_lists_again_when_messages_were_lost_meanwhile(
    config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    """The ephemeral consumer disappears, and the stream drops messages past its position
    before the watch notices: the watch lists again (a second Synced)."""
    await js.add_stream(
        nats.js.api.StreamConfig(
            name=config.stream, subjects=[f"{config.subject_prefix}.>"], max_msgs=4
        )
    )
    sink = NatsSink(config)
    ev = Events()
    try:
        await ev.publish(sink, ev.make(Added, ["a", "b", "c"]))
        w = watch(config)
        it = aiter(w)
        try:
            first = [await next_item(it) for _ in range(4)]
            assert [summary(i) for i in first] == [
                ("added", "a", True),
                ("added", "b", True),
                ("added", "c", True),
                "synced",
            ]
            for item in first:
                if isinstance(item, Delivery):
                    await item.ack()
            assert w.consumer_name is not None
            await js.delete_consumer(config.stream, w.consumer_name)
            await ev.publish(sink, ev.make(Added, ["d", "e", "f", "g"]))
            await ev.publish(sink, ev.make(Modified, ["a"], etag="e2"))  # d is gone now
            again = [await next_item(it) for _ in range(5)]
        finally:
            await w.aclose()
    finally:
        await sink.aclose()
        await js.delete_stream(config.stream)
    assert [summary(i) for i in again] == [
        ("added", "e", True),
        ("added", "f", True),
        ("added", "g", True),
        ("modified", "a", True),
        "synced",
    ]


async def test_consumer_deleted_after_the_list_resumes_where_it_was(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    ev = Events()
    await ev.publish(sink, ev.make(Added, ["a"]))
    async with collecting(watch(config, durable="ops")) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
        await js.delete_consumer(config.stream, "ops")
        later = await ev.publish(sink, ev.make(Added, ["b"]))
        await seen.wait_for(lambda s: later[0].id in s.ids)
    assert [summary(i) for i in seen.items] == [
        ("added", "a", True),
        "synced",
        ("added", "b", False),
    ]


async def test_a_stream_deleted_and_created_again_is_listed_again(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    ev = Events()
    await ev.publish(sink, ev.make(Added, ["a", "b"]))
    async with collecting(watch(config)) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
        await js.delete_stream(config.stream)
        fresh = ev.make(Added, ["c"])
        await publish_retrying(sink, fresh)  # the sink creates the stream again
        await seen.wait_for(lambda s: s.synced == 2)
    assert [summary(i) for i in seen.items] == [
        ("added", "a", True),
        ("added", "b", True),
        "synced",
        ("added", "c", True),
        "synced",
    ]


async def test_stream_created_after_the_watch_started(config: NatsSinkConfig) -> None:
    sink = NatsSink(config)
    try:
        async with collecting(watch(config)) as seen:
            await sink.publish("files", object_events(["a"]))
            await seen.wait_for(lambda s: len(s.deliveries) == 1)
        assert seen.ids == [object_events(["a"])[0].id]
    finally:
        await sink.aclose()
        nc = await nats.connect(config.url)
        await nc.jetstream().delete_stream(config.stream)
        await nc.close()


# -- undecodable messages ---------------------------------------------------------------------


def unknown_type_event() -> bytes:
    """A well-formed CloudEvent of a type this version does not know."""
    document = json.loads(object_events(["weird"])[0].to_structured())
    document["type"] = "dev.koprs.external.renamed.v1"
    return json.dumps(document).encode()


async def publish_raw(
    js: nats.js.JetStreamContext, config: NatsSinkConfig, token: str, body: bytes
) -> None:
    await js.publish(f"{config.subject_prefix}.files.{token}", body, stream=config.stream)


async def test_undecodable_messages_are_skipped_and_terminated(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    ev = Events()
    await ev.publish(sink, ev.make(Added, ["a"]))
    await publish_raw(js, config, "garbage", b"not json")
    await publish_raw(js, config, "weird", unknown_type_event())
    async with collecting(watch(config, durable="ops")) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
        await publish_raw(js, config, "garbage2", b"{}")
        later = await ev.publish(sink, ev.make(Added, ["b"]))
        await seen.wait_for(lambda s: later[0].id in s.ids)
    assert [summary(i) for i in seen.items] == [
        ("added", "a", True),
        "synced",
        ("added", "b", False),
    ]
    info = await js.consumer_info(config.stream, "ops")
    assert info.num_ack_pending == 0  # terminated, not left to come again
    assert info.num_pending == 0


async def test_decode_errors_can_be_raised_and_the_watch_goes_on(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    ev = Events()
    await publish_raw(js, config, "garbage", b"not json")
    await publish_raw(js, config, "weird", unknown_type_event())
    await ev.publish(sink, ev.make(Added, ["a"]))
    w = watch(config, on_decode_error="raise", on_unknown_type="raise")
    it = aiter(w)
    try:
        with pytest.raises(DecodeError, match="garbage") as garbage:
            await next_item(it)
        assert not isinstance(garbage.value, UnknownEventTypeError)
        with pytest.raises(UnknownEventTypeError, match="renamed"):
            await next_item(it)
        rest = [summary(await next_item(it)) for _ in range(2)]
    finally:
        await w.aclose()
    assert rest == [("added", "a", True), "synced"]


async def test_unknown_types_alone_can_be_raised(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    await publish_raw(js, config, "garbage", b"not json")
    await publish_raw(js, config, "weird", unknown_type_event())
    w = watch(config, on_unknown_type="raise")
    it = aiter(w)
    try:
        with pytest.raises(UnknownEventTypeError):
            await next_item(it)
        assert summary(await next_item(it)) == "synced"
    finally:
        await w.aclose()


# -- the object -------------------------------------------------------------------------------


async def test_aclose_from_another_task_ends_the_iteration(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    w = watch(config, fetch_timeout_s=30.0)
    it = aiter(w)
    assert summary(await next_item(it)) == "synced"
    name = w.consumer_name
    assert name is not None
    waiting = asyncio.create_task(anext(it))
    await asyncio.sleep(0)  # let it start waiting
    await w.aclose()
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(10):
            await waiting
    with pytest.raises(nats.js.errors.NotFoundError):  # the ephemeral consumer is deleted
        await js.consumer_info(config.stream, name)


async def test_a_client_passed_in_is_not_closed(
    sink: NatsSink, config: NatsSinkConfig, nats_url: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        w = watch_nats(nc, ["files"], stream=config.stream, subject_prefix=config.subject_prefix)
        async with w:
            assert summary(await next_item(aiter(w))) == "synced"
        assert nc.is_connected
    finally:
        await nc.close()


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="source name"):
        NatsWatchConfig(sources=("a.b",))
    with pytest.raises(ConfigError, match="durable"):
        NatsWatchConfig(durable="a.b")
    with pytest.raises(ConfigError, match="on_decode_error"):
        NatsWatchConfig(on_decode_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        NatsWatchConfig(batch_size=0)
    with pytest.raises(ConfigError, match="fetch_timeout_s"):
        NatsWatchConfig(fetch_timeout_s=0)
    with pytest.raises(ConfigError, match="max_deliveries"):
        NatsWatchConfig(max_deliveries=0)
    with pytest.raises(ConfigError, match="dead-letter"):
        NatsWatchConfig(subject_prefix="koprs.deadletter")
    config = NatsWatchConfig(stream="S", subject_prefix="acme.koprs.external")
    assert (config.dead_letter_stream, config.dead_letter_prefix) == (
        "S_DEADLETTER",
        "acme.koprs.deadletter",
    )
    assert NatsWatchConfig(sources=("b", "a")).filter_subjects == [
        "koprs.external.a.>",
        "koprs.external.b.>",
    ]
    assert NatsWatchConfig().filter_subjects == ["koprs.external.>"]
