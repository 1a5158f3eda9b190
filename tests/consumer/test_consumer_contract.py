"""The consumer contract, run against both watch backends: NATS JetStream and Redis Streams.

One :class:`Backend` per broker (a real server, fed by the bridge's own sink) gives the tests
the same vocabulary: publish events of a source, open a watch (``durable`` is a NATS durable
consumer or a Redis consumer group), trim the history, read the dead letters, count what is
still unsettled. Backend-specific behaviour stays in ``test_consumer_nats.py`` and
``test_consumer_redis.py``.

Covered here: list-then-watch and ``Synced``, no gap and no duplicate between list and live,
``list_first=False``, closing from another task, the decode-error policy, durable resume,
fan-out and work split; and what an operator left running for months meets (issue 17): a
Reflector equal to the source after a resume, poison events dead-lettered after N deliveries,
per-item order of retries, trimmed history noticed and listed again, consumer metrics.

"Nothing more was delivered" is checked without waiting for silence: a sentinel event is
published last and must be the very next item.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from bridge.cloudevents import CloudEvent
from bridge.consumer import (
    Delivery,
    EventHandler,
    Reflector,
    Synced,
    Watch,
    WatchItem,
    run_handler,
)
from bridge.errors import DecodeError
from bridge.events import Added, EventKind, Modified, Removed
from bridge.sources.stores import StoredObject
from bridge.telemetry.metrics import ConsumerMetrics
from tests.support.consumers import Backend, backend, events, take
from tests.support.replicas import until

pytestmark = pytest.mark.servers

_revisions = itertools.count(1)


__all__ = ["backend"]  # the fixture, from tests/support/consumers.py

DURABLES = [None, "ops"]
"""Most behaviour must hold with and without a durable consumer (group)."""


# -- helpers ------------------------------------------------------------------------------------


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
        out.append((env.source_name, env.kind, env.key, env.event.resource.etag, item.initial))
    return out


async def expect_sentinel(watch: Watch, backend: Backend, key: str = "sentinel") -> None:
    """Publish one more event: it must be the next item (nothing else was waiting)."""
    await backend.publish(events([key]))
    [item] = await take(watch, 1)
    assert seen([item]) == [("files", "added", key, "e1", False)]
    await settle([item])


def etags(reflector: Reflector, source: str = "files") -> dict[str, str]:
    return {key: resource.etag for key, resource in reflector.items(source).items()}


@contextlib.asynccontextmanager
async def reflecting(watch: Watch, reflector: Reflector | None = None) -> AsyncIterator[Reflector]:
    """A Reflector fed by ``watch`` in a task, for the block."""
    store = reflector if reflector is not None else Reflector()
    task = asyncio.create_task(store.run(watch))
    try:
        yield store
    finally:
        await watch.aclose()
        async with asyncio.timeout(10):
            await task


# -- list, then watch ---------------------------------------------------------------------------


@pytest.mark.parametrize("durable", DURABLES)
async def test_lists_live_items_then_synced_then_live_changes(
    backend: Backend, durable: str | None
) -> None:
    await backend.publish(events(["a", "b", "c"]))
    modified = await backend.publish(events(["b"], Modified, etag="e2"))
    await backend.publish(events(["c"], Removed))
    await backend.publish(events(["w"], source="web"), "web")
    watch = backend.watch("files", "web", durable=durable)

    listed = await take(watch, 4)
    assert sorted(seen(listed[:3]), key=str) == [
        ("files", "added", "a", "e1", True),
        ("files", "added", "b", "e2", True),  # its latest state, as an Added
        ("web", "added", "w", "e1", True),
    ]
    assert [s[2] for s in seen(listed) if s[0] == "files"] == ["a", "b"]  # stream order
    assert listed[3] == Synced(("files", "web"), listed=True)
    [listed_b] = [i for i in listed if isinstance(i, Delivery) and i.envelope.key == "b"]
    assert isinstance(listed_b.envelope.event, Added)
    assert isinstance(listed_b.envelope.event.resource, StoredObject)
    assert listed_b.envelope.type == "dev.koprs.external.modified.v1"  # the context is kept
    assert listed_b.envelope.id == modified[0].id
    await settle(listed)

    later = await backend.publish(events(["a"], Modified, etag="e3"))
    later += await backend.publish(events(["w"], Removed, source="web"), "web")
    live = await take(watch, 2)
    assert sorted(seen(live), key=str) == [
        ("files", "modified", "a", "e3", False),
        ("web", "removed", "w", "e1", False),
    ]
    assert sorted(d.envelope.id for d in live if isinstance(d, Delivery)) == sorted(
        e.id for e in later
    )
    by_key = {d.envelope.key: d.envelope.event for d in live if isinstance(d, Delivery)}
    assert isinstance(by_key["a"], Modified)
    assert isinstance(by_key["w"], Removed)
    await settle(live)
    await expect_sentinel(watch, backend)


@pytest.mark.parametrize("durable", DURABLES)
async def test_nothing_published_gives_synced_at_once(
    backend: Backend, durable: str | None
) -> None:
    watch = backend.watch(durable=durable)
    assert await take(watch, 1) == [Synced(("files",), listed=True)]
    await expect_sentinel(watch, backend, "a")


@pytest.mark.parametrize("durable", DURABLES)
async def test_no_gap_and_no_duplicate_between_the_list_and_live_changes(
    backend: Backend, durable: str | None
) -> None:
    await backend.publish(events(["a", "b"]))
    watch = backend.watch(durable=durable)
    first = await take(watch, 1)  # the snapshot is taken before the first item
    # published after the snapshot and before the live phase
    await backend.publish(events(["a"], Modified, etag="e2"))
    await backend.publish(events(["c"]))

    rest = await take(watch, 4)
    assert seen(first + rest) == [
        ("files", "added", "a", "e1", True),
        ("files", "added", "b", "e1", True),
        "synced",
        ("files", "modified", "a", "e2", False),
        ("files", "added", "c", "e1", False),
    ]
    await settle(first + rest)
    await expect_sentinel(watch, backend)


@pytest.mark.parametrize("durable", DURABLES)
async def test_without_list_first_only_live_changes(backend: Backend, durable: str | None) -> None:
    await backend.publish(events(["old"]))
    watch = backend.watch(durable=durable, list_first=False)
    assert await take(watch, 1) == [Synced(("files",), listed=False)]
    await expect_sentinel(watch, backend, "new")


async def test_closing_from_another_task_ends_the_iteration(backend: Backend) -> None:
    watch = backend.watch(durable="ops", block_s=60, fetch_timeout_s=30)
    assert await take(watch, 1) == [Synced(("files",), listed=True)]
    waiting = asyncio.create_task(anext(aiter(watch)))
    await asyncio.sleep(0)  # let it block in its read
    await watch.aclose()
    async with asyncio.timeout(10):
        with pytest.raises(StopAsyncIteration):
            await waiting


# -- undecodable messages -----------------------------------------------------------------------


@pytest.mark.parametrize("durable", DURABLES)
async def test_undecodable_messages_are_skipped_and_settled(
    backend: Backend, durable: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    await backend.publish(events(["a"]))
    await backend.undecodable()
    watch = backend.watch(durable=durable)
    with caplog.at_level(logging.WARNING, logger="bridge.consumer"):
        listed = await take(watch, 2)
        assert seen(listed) == [("files", "added", "a", "e1", True), "synced"]
        await settle(listed)
        await backend.undecodable()
        await expect_sentinel(watch, backend)
    assert any("skipping" in r.getMessage() for r in caplog.records)
    if durable is not None:
        assert await backend.unsettled(durable) == 0  # settled, never delivered again


async def test_decode_errors_can_be_raised_and_the_watch_goes_on(backend: Backend) -> None:
    watch = backend.watch(durable="ops", on_decode_error="raise")
    assert await take(watch, 1) == [Synced(("files",), listed=True)]
    await backend.undecodable()
    with pytest.raises(DecodeError):
        async with asyncio.timeout(15):
            await anext(aiter(watch))
    await expect_sentinel(watch, backend)


# -- durable consumers / groups -----------------------------------------------------------------


async def test_durable_resumes_without_listing_and_redelivers_only_unacked(
    backend: Backend,
) -> None:
    first = await backend.publish(events(["a", "b", "c"]))
    watch = backend.watch(durable="ops", ack_wait_s=1.0)
    listed = await take(watch, 4)
    assert seen(listed)[-1] == "synced"
    await settle(listed)
    live = await backend.publish(events(["d", "e"]))
    got = await take(watch, 2)
    assert isinstance(got[0], Delivery)
    await got[0].ack()  # "e" is left unacknowledged
    await watch.aclose()

    down = await backend.publish(events(["g"]))  # while it is down
    again = backend.watch(durable="ops", ack_wait_s=1.0)
    resumed = await take(again, 3)
    assert resumed[0] == Synced(("files",), listed=False)  # resumed: no list
    by_id = {d.envelope.id: d for d in resumed[1:] if isinstance(d, Delivery)}
    assert set(by_id) == {live[1].id, down[0].id}  # the unacknowledged one and the new one
    assert not any(d.initial for d in by_id.values())
    assert by_id[live[1].id].attempt == 2  # the broker's count
    assert by_id[down[0].id].attempt == 1
    await settle(resumed)
    await expect_sentinel(again, backend)
    assert await backend.unsettled("ops") == 0
    assert seen(listed)[:3] == [("files", "added", e.subject, "e1", True) for e in first]


async def test_every_durable_gets_every_event(backend: Backend) -> None:
    await backend.publish(events(["a", "b"]))
    watches = [backend.watch(durable="one"), backend.watch(durable="two"), backend.watch()]
    for watch in watches:
        listed = await take(watch, 3)
        assert seen(listed) == [
            ("files", "added", "a", "e1", True),
            ("files", "added", "b", "e1", True),
            "synced",
        ]
        await settle(listed)
    later = await backend.publish(events(["a"], Modified, etag="e2"))
    later += await backend.publish(events(["c"]))
    for watch in watches:
        live = await take(watch, 2)
        assert seen(live) == [
            ("files", "modified", "a", "e2", False),
            ("files", "added", "c", "e1", False),
        ]
        assert [d.envelope.id for d in live if isinstance(d, Delivery)] == [e.id for e in later]
        await settle(live)
    for watch in watches:
        await expect_sentinel(watch, backend, f"sentinel-{watches.index(watch)}")
        for other in watches:  # each sentinel reaches every watch
            if other is not watch:
                [item] = await take(other, 1)
                await settle([item])


async def test_watches_sharing_a_durable_split_the_events(backend: Backend) -> None:
    got: dict[str, list[str]] = {"c1": [], "c2": []}
    has_one = {"c1": asyncio.Event(), "c2": asyncio.Event()}
    synced = {"c1": asyncio.Event(), "c2": asyncio.Event()}
    done = asyncio.Event()
    expected: set[str] = set()

    async def consume(name: str, other: str) -> None:
        watch = backend.watch(durable="workers", consumer=name, batch_size=1)
        async for item in watch:
            if isinstance(item, Synced):
                synced[name].set()
                continue
            got[name].append(item.envelope.id)
            has_one[name].set()
            await has_one[other].wait()  # hold it: the other one must get the next events
            await item.ack()
            if expected and set(got["c1"]) | set(got["c2"]) >= expected:
                done.set()

    tasks = [asyncio.create_task(consume("c1", "c2")), asyncio.create_task(consume("c2", "c1"))]
    try:
        async with asyncio.timeout(30):
            await synced["c1"].wait()
            await synced["c2"].wait()
            batch = events([f"k{i}" for i in range(20)])
            expected.update(e.id for e in batch)
            await backend.publish(batch)
            await done.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert got["c1"]
    assert got["c2"]
    assert set(got["c1"]) | set(got["c2"]) == expected
    assert not set(got["c1"]) & set(got["c2"])
    assert len(got["c1"]) + len(got["c2"]) == len(expected)
    assert await backend.unsettled("workers") == 0


# -- broker restart ----------------------------------------------------------------------------


@pytest.mark.parametrize("durable", DURABLES)
async def test_after_a_broker_restart_a_reflector_equals_a_fresh_list(
    backend: Backend, durable: str | None
) -> None:
    """NATS keeps its data over the restart, this Redis loses it (no persistence): either way the
    watch recovers by itself and its Reflector ends up equal to what a new watch lists."""
    await backend.publish(events(["a", "b"]))
    reflector = Reflector()
    async with reflecting(backend.watch(durable=durable), reflector):
        async with asyncio.timeout(15):
            await reflector.wait_synced()
        await backend.restart()
        await backend.publish_retrying(events(["c"]))
        async with asyncio.timeout(30):
            await reflector.wait_for(lambda r: r.get("files", "c") is not None)
            expected = await backend.fresh_list()
            await reflector.wait_for(lambda r: etags(r) == expected)
    assert "c" in expected
    assert ("a" in expected) == (backend.kind == "nats")


# -- a Reflector across restarts (issue 17.1) ---------------------------------------------------


def source_state(history: Sequence[CloudEvent]) -> dict[str, str]:
    """key -> etag of the items live after ``history``."""
    state: dict[str, str] = {}
    for event in history:
        if event.type.split(".")[-2] == "removed":
            state.pop(event.subject, None)
        else:
            state[event.subject] = event.data["etag"]
    return state


async def test_a_reflector_restarted_on_its_durable_equals_the_source(backend: Backend) -> None:
    history = await backend.publish(events([f"k{i:02}" for i in range(20)]))
    async with reflecting(backend.watch(durable="cache", list_on_resume=True)) as first:
        async with asyncio.timeout(15):
            await first.wait_synced()
        assert etags(first) == source_state(history)
    # while it is down
    history += await backend.publish(events(["k00", "k01", "k02"], Modified, etag="e2"))
    history += await backend.publish(events(["k03", "k04"], Removed))
    history += await backend.publish(events(["new1", "new2"]))

    watch = backend.watch(durable="cache", list_on_resume=True)
    listed = await take(watch, 21)  # a fresh process: an empty store, the durable resumed
    assert listed[-1] == Synced(("files",), listed=True)
    assert all(isinstance(i, Delivery) and i.initial for i in listed[:-1])
    restarted = Reflector()
    for item in listed:
        restarted.apply(item)
    await settle(listed)
    assert etags(restarted) == source_state(history)
    # and goes on from the durable's position after the list: nothing of it comes again
    await expect_sentinel(watch, backend)


async def test_a_reflector_fed_by_a_resumed_watch_keeps_its_items(backend: Backend) -> None:
    history = await backend.publish(events([f"k{i:02}" for i in range(20)]))
    reflector = Reflector()
    async with reflecting(backend.watch(durable="cache"), reflector), asyncio.timeout(15):
        await reflector.wait_synced()
    history += await backend.publish(events(["k00"], Modified, etag="e2"))
    history += await backend.publish(events(["k01"], Removed))
    watch = backend.watch(durable="cache")  # resumes without listing
    async with reflecting(watch, reflector), asyncio.timeout(15):
        await reflector.wait_for(lambda r: r.get("files", "k01") is None)
        await reflector.wait_for(lambda r: r.get("files", "k00").etag == "e2")
        assert etags(reflector) == source_state(history)  # 19 items, not the 1 changed


# -- poison events (issue 17.2) -----------------------------------------------------------------


class Failing(EventHandler[list[str]]):
    """Handles every event but fails for ever on ``poison``; records what it handled."""

    def __init__(self, poison: str) -> None:
        self.poison = poison
        self.calls: list[tuple[str, int]] = []
        self.synced = asyncio.Event()

    async def init(self) -> list[str]:
        return []

    async def handle_synced(self, synced: Synced, state: list[str]) -> list[str]:
        self.synced.set()
        return state

    async def handle_delivery(self, delivery: Delivery, state: list[str]) -> list[str]:
        self.calls.append((delivery.envelope.key, delivery.attempt))
        if delivery.envelope.key == self.poison:
            raise RuntimeError(f"cannot handle {self.poison}")
        return [*state, delivery.envelope.key]


@contextlib.asynccontextmanager
async def handling(
    handler: EventHandler[Any], watch: Watch, **options: Any
) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(
        run_handler(handler, watch, initial_backoff_s=0.01, max_backoff_s=0.05, **options)
    )
    try:
        yield task
    finally:
        await watch.aclose()
        async with asyncio.timeout(10):
            await task


async def test_a_poison_event_is_dead_lettered_after_max_deliveries(backend: Backend) -> None:
    handler = Failing("b")
    metrics = ConsumerMetrics()
    watch = backend.watch(durable="ops", max_deliveries=3)
    async with handling(handler, watch, metrics=metrics) as task:
        async with asyncio.timeout(15):
            await handler.synced.wait()
        published = await backend.publish(events(["a", "b", "c"]))

        def dead_lettered() -> bool:
            return metrics.value("consumer_dead_letters_total", consumer="ops", source="files") > 0

        await until(dead_lettered, "the dead letter")
        await until(lambda: ("c", 1) in handler.calls, "c")
        await backend.publish(events(["sentinel"]))
        await until(
            lambda: (
                metrics.value("consumer_events_handled_total", consumer="ops", source="files") == 3
            ),
            "the sentinel handled",
        )
    state = task.result()
    assert state == ["a", "c", "sentinel"]  # the others were not blocked
    assert [c for c in handler.calls if c[0] == "b"] == [("b", 1), ("b", 2), ("b", 3)]
    [letter] = await backend.dead_letters()
    assert letter.error == "RuntimeError: cannot handle b"
    assert letter.deliveries == 3
    assert letter.envelope is not None
    assert letter.envelope.id == published[1].id
    assert letter.envelope.source_name == "files"
    assert letter.envelope.key == "b"
    assert "ops" in letter.consumer
    assert await backend.unsettled("ops") == 0  # acknowledged
    labels = {"consumer": "ops", "source": "files"}
    assert metrics.value("consumer_dead_letters_total", **labels) == 1
    assert metrics.value("consumer_handler_failures_total", **labels) == 3
    assert metrics.value("consumer_redeliveries_total", **labels) == 2
    assert metrics.value("consumer_events_handled_total", **labels) == 3
    assert metrics.value("consumer_lag_events", **labels) == 0


async def test_an_event_delivered_past_max_deliveries_is_dead_lettered_unhandled(
    backend: Backend,
) -> None:
    """A consumer that dies while handling an event (again and again) cannot fail it: the next
    consumer gets it past the bound and dead-letters it without calling its handler."""
    dying = backend.watch(durable="ops", consumer="dying", ack_wait_s=1.0)
    assert await take(dying, 1) == [Synced(("files",), listed=True)]
    published = await backend.publish(events(["crash"]))
    [got] = await take(dying, 1)
    assert isinstance(got, Delivery)
    assert got.attempt == 1
    await dying.aclose()  # "died" handling it: never settled

    handler = Failing("none")
    watch = backend.watch(
        durable="ops", consumer="live", ack_wait_s=1.0, max_deliveries=1, claim_idle_s=0.05
    )
    async with handling(handler, watch):
        await until(lambda: backend_dead_letters(backend), "the dead letter")
        await until(lambda: backend_settled(backend, "ops"), "the dead letter acknowledged")
    [letter] = await backend.dead_letters()
    assert letter.envelope is not None
    assert letter.envelope.id == published[0].id
    assert letter.deliveries == 2
    assert "without being settled" in letter.error
    assert handler.calls == []  # not handled
    assert await backend.unsettled("ops") == 0


async def backend_dead_letters(backend: Backend) -> bool:
    return bool(await backend.dead_letters())


async def backend_settled(backend: Backend, durable: str) -> bool:
    return await backend.unsettled(durable) == 0


# -- per-item order (issue 17.3) ----------------------------------------------------------------


async def test_an_old_retry_is_not_applied_after_a_newer_event_of_its_item(
    backend: Backend,
) -> None:
    """ "a" v1 fails until v2 of "a" was handled; its retry then comes after v2: dropped."""
    applied: list[tuple[str, str]] = []
    failed_once, synced = asyncio.Event(), asyncio.Event()

    class Handler(EventHandler[None]):
        async def handle_synced(self, item: Synced, state: None) -> None:
            synced.set()

        async def handle_event(self, kind: EventKind, resource: Any, state: None) -> None:
            if resource.etag == "v1" and ("a", "v2") not in applied:
                failed_once.set()
                raise RuntimeError("not yet")
            applied.append((resource.key, resource.etag))

    metrics = ConsumerMetrics()
    watch = backend.watch(durable="ops", list_first=False, max_deliveries=None)
    async with handling(Handler(), watch, metrics=metrics):
        async with asyncio.timeout(15):
            await synced.wait()
        await backend.publish(events(["a"], etag="v1"))
        async with asyncio.timeout(15):
            await failed_once.wait()
        await backend.publish(events(["a"], Modified, etag="v2"))

        def dropped() -> bool:
            return metrics.value("consumer_stale_events_total", consumer="ops", source="files") > 0

        await until(dropped, "the stale retry to be dropped")
        await backend.publish(events(["b"]))
        await until(  # counted once acknowledged
            lambda: (
                metrics.value("consumer_events_handled_total", consumer="ops", source="files") == 2
            ),
            "b handled",
        )
    assert applied == [("a", "v2"), ("b", "e1")]  # never v1 after v2
    assert await backend.unsettled("ops") == 0  # the stale retry was acknowledged


# -- trimmed history (issue 17.4) ---------------------------------------------------------------


async def test_a_position_trimmed_away_is_noticed_and_listed_again(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    history = await backend.publish(events(["a", "b", "c", "d"]))
    reflector = Reflector()
    async with reflecting(backend.watch(durable="ops"), reflector), asyncio.timeout(15):
        await reflector.wait_synced()
    # while it is down: "d" is removed, then its removal is trimmed away with older events
    history += await backend.publish(events(["d"], Removed))
    history += await backend.publish(events(["a", "b", "c"], Modified, etag="e2"))
    await backend.trim(keep=3)

    watch = backend.watch(durable="ops")
    with caplog.at_level(logging.WARNING, logger="bridge.consumer"):
        items = await take(watch, 4)
    assert seen(items) == [
        ("files", "added", "a", "e2", True),
        ("files", "added", "b", "e2", True),
        ("files", "added", "c", "e2", True),
        "synced",
    ]
    assert items[-1] == Synced(("files",), listed=True)
    for item in items:
        reflector.apply(item)
    await settle(items)
    assert etags(reflector) == source_state(history)  # "d" does not linger
    assert any("listing again" in r.getMessage() for r in caplog.records)
    await expect_sentinel(watch, backend)


@pytest.mark.parametrize("durable", DURABLES)
async def test_a_watch_falling_behind_trimming_lists_again(
    backend: Backend, durable: str | None
) -> None:
    await backend.publish(events(["a", "b", "c", "d"]))
    watch = backend.watch(durable=durable, batch_size=1)
    listed = await take(watch, 5)
    await settle(listed)
    await backend.publish(events(["d"], Removed))
    await backend.publish(events(["a", "b", "c"], Modified, etag="e2"))
    [first] = await take(watch, 1)  # the removal of "d" was read...
    assert seen([first]) == [("files", "removed", "d", "e1", False)]
    await backend.publish(events(["a", "b", "c"], Modified, etag="e3"))
    await backend.trim(keep=3)  # ... not the rest: trimmed before the watch read it
    await settle([first])

    items = await take(watch, 4)
    assert seen(items) == [
        ("files", "added", "a", "e3", True),
        ("files", "added", "b", "e3", True),
        ("files", "added", "c", "e3", True),
        "synced",
    ]
    assert items[-1] == Synced(("files",), listed=True)
    await settle(items)
    await expect_sentinel(watch, backend)


# -- consumer metrics (issue 17.5) --------------------------------------------------------------


async def test_lag_is_measured_while_events_wait(backend: Backend) -> None:
    pending: list[int | None] = []
    synced = asyncio.Event()

    class Recording(EventHandler[None]):
        async def handle_synced(self, item: Synced, state: None) -> None:
            synced.set()

        async def handle_delivery(self, delivery: Delivery, state: None) -> None:
            pending.append(delivery.pending)

    metrics = ConsumerMetrics()
    watch = backend.watch(durable="ops", list_first=False, batch_size=10)
    async with handling(Recording(), watch, metrics=metrics):
        async with asyncio.timeout(15):
            await synced.wait()
        await backend.publish(events([f"n{i}" for i in range(5)]))
        await until(
            lambda: (
                metrics.value("consumer_events_handled_total", consumer="ops", source="files") == 5
            ),
            "5 events handled",
        )
    labels = {"consumer": "ops", "source": "files"}
    assert len(pending) == 5
    assert all(isinstance(n, int) for n in pending)
    assert pending[-1] == 0
    assert metrics.value("consumer_lag_events", **labels) == 0
    assert metrics.value("consumer_lag_seconds", **labels) == 0
    assert b"koprs_bridge_consumer_lag_events" in metrics.render()
