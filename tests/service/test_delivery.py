"""The delivery rule: poll -> publish -> all acks -> commit, with failures at every step."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bridge import MemoryStore, ObjectStorePoller
from bridge.errors import StateError
from bridge.events import Added
from bridge.service.delivery import SourceLoop, SourceSpec
from bridge.sinks.memory import MemorySink
from bridge.sources.base import Changeset, Replay, StateDelta
from bridge.state import Intent, MemoryStateStore
from bridge.state.files import FileStateStore
from bridge.watching import WatchConfig

ADDED, MODIFIED, REMOVED = (f"dev.koprs.external.{k}.v1" for k in ("added", "modified", "removed"))


class CountingPoller(ObjectStorePoller):
    polls = 0

    async def changes(self, replay: Replay | None = None) -> Changeset:
        self.polls += 1
        return await super().changes(replay)


def make_loop(
    store: MemoryStore, sink: MemorySink, state: object
) -> tuple[SourceLoop, CountingPoller]:
    poller = CountingPoller(store).with_name("files")
    spec = SourceSpec(name="files", source=poller, watch=WatchConfig(1), source_uri="memory://t")
    return SourceLoop(spec, sink, state), poller  # type: ignore[arg-type]


def kinds(sink: MemorySink) -> list[tuple[str, str]]:
    return [(e.type.split(".")[-2], e.subject) for e in sink.events("files")]


async def test_state_is_committed_only_after_the_broker_acknowledged() -> None:
    store, sink, state = MemoryStore(), MemorySink(), MemoryStateStore()
    loop, _ = make_loop(store, sink, state)
    await store.put("a", b"1")
    sink.block()
    step = asyncio.create_task(loop.step())
    await sink.wait_for_calls(1)  # wait until the publish is in flight
    recorded = state.checkpoints["files"]
    assert (recorded.revision, recorded.state) == (0, {})  # nothing committed yet...
    assert recorded.intent is not None  # ...only the intent to publish
    assert list(recorded.intent.delta) == ["a"]
    sink.unblock()
    assert await step is None
    assert state.checkpoints["files"].state == {"a": (await store.list().__anext__())[0].etag}
    assert state.checkpoints["files"].revision == 1
    assert state.checkpoints["files"].intent is None


async def test_failed_publish_is_retried_from_a_new_poll_against_the_checkpoint() -> None:
    store, sink, state = MemoryStore(), MemorySink(), MemoryStateStore()
    loop, poller = make_loop(store, sink, state)
    await store.put("a", b"1")
    await store.put("b", b"1")
    sink.fail_next(2, landed=1)  # a broker that acknowledged one event, then failed (twice)
    assert await loop.step() is not None  # added a landed
    await store.delete("a")  # a change meanwhile: the retry polls again and sees it
    assert await loop.step() is not None  # replay: added b (landed), removed a (lost)
    assert poller.polls == 2
    assert await loop.step() is None  # replay of the replay: removed a is not forgotten
    assert kinds(sink) == [("added", "a"), ("added", "b"), ("removed", "a")]
    assert sink.duplicates == 1  # added b, published again with its id
    checkpoint = state.checkpoints["files"]
    assert (list(checkpoint.state), checkpoint.intent) == (["b"], None)
    assert await loop.step() is None
    assert len(kinds(sink)) == 3


async def test_failed_commit_is_retried_without_publishing_again() -> None:
    class FlakyState(MemoryStateStore):
        failures = 1

        async def commit(
            self,
            source_name: str,
            revision: int,
            delta: StateDelta,
            next_intent: Intent | None = None,
        ) -> None:
            if self.failures:
                self.failures -= 1
                raise StateError("redis down")
            await super().commit(source_name, revision, delta, next_intent)

    store, sink, state = MemoryStore(), MemorySink(), FlakyState()
    loop, poller = make_loop(store, sink, state)
    await store.put("a", b"1")
    assert isinstance(await loop.step(), StateError)
    assert await loop.step() is None
    assert (sink.publish_calls, poller.polls) == (1, 1)
    assert state.checkpoints["files"].revision == 1


async def test_restart_resumes_from_checkpoint_and_sees_removals_made_while_down(
    tmp_path: Path,
) -> None:
    store, sink = MemoryStore(), MemorySink()
    await store.put("a", b"1")
    await store.put("b", b"1")
    first, _ = make_loop(store, sink, FileStateStore(tmp_path))
    await first.restore()
    assert await first.step() is None
    await store.delete("a")  # while no bridge runs
    await store.put("b", b"2")
    second, _ = make_loop(store, sink, FileStateStore(tmp_path))
    await second.restore()
    assert second.revision == first.revision != 0
    assert await second.step() is None
    assert kinds(sink) == [("added", "a"), ("added", "b"), ("modified", "b"), ("removed", "a")]


async def test_rederived_events_have_the_same_ids_and_recreations_new_ones() -> None:
    store, state = MemoryStore(), MemoryStateStore()
    await store.put("a", b"1")
    sinks = [MemorySink(), MemorySink()]
    loops = [make_loop(store, sink, state)[0] for sink in sinks]
    for loop in loops:  # two replicas restoring the same checkpoint...
        await loop.restore()
    for loop in loops:  # ...derive the same change with the same id
        assert await loop.step() is None
    assert sinks[0].events("files")[0].id == sinks[1].events("files")[0].id
    loop = loops[0]
    for change in (store.delete("a"), store.put("a", b"1")):
        await change
        assert await loop.step() is None
    added = [e for e in sinks[0].events("files") if e.type == ADDED]
    assert len(added) == 2
    assert added[0].id != added[1].id  # the same content, recreated later: a new event


async def test_a_lost_state_starts_a_lineage_whose_ids_do_not_repeat(tmp_path: Path) -> None:
    store = MemoryStore()
    await store.put("a", b"1")
    ids = []
    for folder in ("before", "after-the-state-was-lost"):
        sink = MemorySink()
        loop, _ = make_loop(store, sink, FileStateStore(tmp_path / folder))
        await loop.restore()
        assert await loop.step() is None
        ids.append(sink.events("files")[0].id)
    assert ids[0] != ids[1]  # or a broker's dedup window could swallow the second Added


async def test_plain_source_events_stay_pending_until_published() -> None:
    class Ticker:
        name = "ticker"
        n = 0

        async def poll(self) -> list[Added[dict[str, int]]]:
            self.n += 1
            return [Added({"n": self.n})]

    sink = MemorySink()
    spec = SourceSpec(name="ticker", source=Ticker(), watch=WatchConfig(1), source_uri="urn:t")
    loop = SourceLoop(spec, sink, MemoryStateStore())
    sink.fail_next(1)
    assert await loop.step() is not None
    assert await loop.step() is None
    assert [e.data["value"] for e in sink.events("ticker")] == [{"n": 1}]


@pytest.mark.parametrize("busy", [False, True])
async def test_run_stops_promptly_without_leaking_tasks(busy: bool, tmp_path: Path) -> None:
    from bridge.secrets import Secret
    from bridge.service.config import BridgeConfig, BrokerConfig, LocalSourceConfig, SourceConfig
    from bridge.service.runner import Bridge

    config = BridgeConfig(
        broker=BrokerConfig(url=Secret.inline("nats://127.0.0.1:1")),
        sources=(
            SourceConfig(name="files", interval_s=3600, local=LocalSourceConfig(path=tmp_path)),
        ),
    )
    (tmp_path / "f").write_text("x")
    sink = MemorySink()
    bridge = Bridge(config, sink=sink, shutdown_grace_s=0.01)
    stop = asyncio.Event()
    if busy:
        sink.block()  # the first publish never completes: shutdown must abandon it
    runner = asyncio.create_task(bridge.run(stop))
    if busy:
        await sink.wait_for_calls(1)
    else:
        await sink.wait_for(1, "files")
    stop.set()
    await runner
    assert not sink.connected


async def test_batch_published_by_a_replica_that_died_before_committing_is_settled(
    tmp_path: Path,
) -> None:
    """Added went out, the replica died before its commit, the item was deleted meanwhile:
    the next leader must publish Removed (it polls against the state the intent led to)."""
    store, sink = MemoryStore(), MemorySink()
    await store.put("a", b"1")
    dying, _ = make_loop(store, sink, DiesBeforeCommit(tmp_path))
    await dying.restore()
    assert await dying.step() is not None
    assert kinds(sink) == [("added", "a")]
    await store.delete("a")
    successor, poller = make_loop(store, sink, FileStateStore(tmp_path))
    await successor.restore()
    assert await successor.step() is None  # polls against the state the intent led to
    assert poller.polls == 1
    assert kinds(sink) == [("added", "a"), ("removed", "a")]
    reloaded = await FileStateStore(tmp_path).load("files")
    assert reloaded is not None
    assert (reloaded.state, reloaded.intent) == ({}, None)
    assert reloaded.revision == successor.revision


async def test_large_changesets_go_out_in_batches_committed_one_by_one() -> None:
    store, sink, state = MemoryStore(), MemorySink(), MemoryStateStore()
    for i in range(25):
        await store.put(f"k{i:02}", b"x")
    poller = CountingPoller(store).with_name("files")
    spec = SourceSpec(
        name="files",
        source=poller,
        watch=WatchConfig(1),
        source_uri="memory://t",
        max_batch_events=10,
    )
    loop = SourceLoop(spec, sink, state)
    sink.fail_next(1)
    assert await loop.step() is not None
    assert state.checkpoints["files"].state == {}  # the first batch failed: nothing committed
    assert await loop.step() is None
    assert sink.publish_calls == 4  # 1 failed + 3 batches of at most 10
    assert len(state.checkpoints["files"].state) == 25
    assert state.checkpoints["files"].revision == 1
    assert {e.subject for e in sink.events("files")} == {f"k{i:02}" for i in range(25)}
    assert poller.polls == 2  # the failed first batch was re-derived from a new poll


class DiesBeforeCommit(FileStateStore):
    """A replica that publishes, then dies before its commit (after ``survives`` commits of a
    batch; the empty commit that starts a lineage always gets through)."""

    def __init__(self, folder: Path, survives: int = 0) -> None:
        super().__init__(folder)
        self.survives = survives

    async def commit(
        self,
        source_name: str,
        revision: int,
        delta: StateDelta,
        next_intent: Intent | None = None,
    ) -> None:
        if delta:
            if not self.survives:
                raise StateError("replica killed")
            self.survives -= 1
        await super().commit(source_name, revision, delta, next_intent)


async def _died_after_publishing(
    tmp_path: Path, store: MemoryStore, sink: MemorySink, *, max_batch_events: int = 1000
) -> SourceLoop:
    """Deliver once with a replica that dies before its commit; then return its successor."""
    dying, _ = make_loop(store, sink, DiesBeforeCommit(tmp_path))
    dying.spec.max_batch_events = max_batch_events
    await dying.restore()
    assert await dying.step() is not None
    successor, _ = make_loop(store, sink, FileStateStore(tmp_path))
    successor.spec.max_batch_events = max_batch_events
    await successor.restore()
    return successor


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # nothing changed since: the intent's events again, same ids, dropped by the broker
        (None, [("added", "a"), ("added", "b")]),
        # a changed again, b deleted: diffed against what the intent published
        ("mutate", [("added", "a"), ("added", "b"), ("modified", "a"), ("removed", "b")]),
    ],
)
async def test_replay_of_an_unsettled_batch(
    tmp_path: Path, change: str | None, expected: list[tuple[str, str]]
) -> None:
    store, sink = MemoryStore(), MemorySink()
    await store.put("a", b"1")
    await store.put("b", b"1")
    successor = await _died_after_publishing(tmp_path, store, sink)
    first = [(e.id, e.subject) for e in sink.events("files")]
    if change == "mutate":
        await store.put("a", b"2")
        await store.delete("b")
    assert await successor.step() is None
    assert kinds(sink) == expected
    assert sink.duplicates == (2 if change is None else 0)
    assert [(e.id, e.subject) for e in sink.events("files")][:2] == first
    reloaded = await FileStateStore(tmp_path).load("files")
    assert reloaded is not None
    assert reloaded.intent is None
    assert reloaded.state == {o.path: o.etag async for p in store.list() for o in p}
    assert reloaded.revision == successor.revision


async def test_replay_of_a_removal_and_of_a_recreation(tmp_path: Path) -> None:
    store, sink = MemoryStore(), MemorySink()
    await store.put("gone", b"1")
    await store.put("back", b"1")
    loop, _ = make_loop(store, sink, FileStateStore(tmp_path))
    await loop.restore()
    assert await loop.step() is None
    await store.delete("gone")
    await store.delete("back")
    successor = await _died_after_publishing(tmp_path, store, sink)
    assert kinds(sink)[-2:] == [("removed", "back"), ("removed", "gone")]
    await store.put("back", b"2")  # recreated while no replica led
    assert await successor.step() is None
    assert kinds(sink)[2:] == [("removed", "back"), ("removed", "gone"), ("added", "back")]
    assert sink.duplicates == 1  # Removed of "gone" again, same id
    reloaded = await FileStateStore(tmp_path).load("files")
    assert reloaded is not None
    assert set(reloaded.state) == {"back"}


async def test_replay_split_in_batches_keeps_the_rest_of_the_intent_recorded(
    tmp_path: Path,
) -> None:
    """A replay committed batch by batch: until its last batch is committed the old intent's
    unsettled entries stay recorded, so a second crash still settles them."""
    store, sink = MemoryStore(), MemorySink()
    for i in range(4):
        await store.put(f"k{i}", b"1")
    successor = await _died_after_publishing(tmp_path, store, sink, max_batch_events=10)
    for i in range(4, 10):
        await store.put(f"k{i}", b"1")  # new objects: with the replay, 10 events...
    await store.delete("k3")  # ...and k3, published as Added, is gone
    successor.spec.max_batch_events = 3

    successor.state = DiesBeforeCommit(tmp_path, survives=1)  # dies after its first batch
    assert await successor.step() is not None
    recorded = await FileStateStore(tmp_path).load("files")
    assert recorded is not None
    assert recorded.intent is not None
    assert "k3" in recorded.intent.delta  # the Added of k3 may have been published
    third, _ = make_loop(store, sink, FileStateStore(tmp_path))
    await third.restore()
    assert await third.step() is None
    latest = {}
    for kind, key in kinds(sink):
        latest[key] = kind
    assert latest.pop("k3") == "removed"
    assert set(latest) == {f"k{i}" for i in range(10) if i != 3}
    assert set(latest.values()) == {"added"}


@pytest.mark.parametrize(
    ("after", "expected", "duplicates"),
    [
        (b"v2", [("modified", "doc")], 1),  # unchanged since the intent: the same event again
        (b"v3", [("modified", "doc"), ("modified", "doc")], 0),  # changed again
        (None, [("modified", "doc"), ("removed", "doc")], 0),  # gone since
    ],
)
async def test_http_replay_of_an_unsettled_batch(
    tmp_path: Path, after: bytes | None, expected: list[tuple[str, str]], duplicates: int
) -> None:
    """An HTTP document's Modified was published by a replica that died before its commit; the
    successor fetches it unconditionally and emits the same event again or diffs against it."""
    from bridge.sources.http import HttpPoller
    from tests.support.httpserver import Documents

    with Documents() as docs:
        url = docs.url("doc")

        def http_loop(state: FileStateStore) -> SourceLoop:
            poller = HttpPoller(url).with_name("files")
            spec = SourceSpec(name="files", source=poller, watch=WatchConfig(1), source_uri=url)
            return SourceLoop(spec, sink, state)

        sink = MemorySink()
        docs.set("doc", b"v1")
        first = http_loop(FileStateStore(tmp_path))
        await first.restore()
        assert await first.step() is None
        docs.set("doc", b"v2")
        dying = http_loop(DiesBeforeCommit(tmp_path))
        await dying.restore()
        assert await dying.step() is not None
        await first.spec.source.aclose()  # type: ignore[attr-defined]
        await dying.spec.source.aclose()  # type: ignore[attr-defined]
        docs.set("doc", after)
        successor = http_loop(FileStateStore(tmp_path))
        await successor.restore()
        assert await successor.step() is None
        await successor.spec.source.aclose()  # type: ignore[attr-defined]
    assert [(k, s.rsplit("/", 1)[-1]) for k, s in kinds(sink)] == [("added", "doc"), *expected]
    assert sink.duplicates == duplicates
    reloaded = await FileStateStore(tmp_path).load("files")
    assert reloaded is not None
    assert reloaded.intent is None
    assert ("digest" in reloaded.state) == (after is not None)


async def test_file_journal_round_trips_intents_and_stays_bounded(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    await store.commit("s", 1, {f"k{i}": "v" for i in range(10)})
    await store.begin("s", Intent(2, {"k0": None}))
    await store.commit("s", 1, {"k0": None}, next_intent=Intent(2, {"k1": "w"}))
    loaded = await FileStateStore(tmp_path).load("s")
    assert loaded is not None
    assert (loaded.revision, len(loaded.state), loaded.intent) == (1, 9, Intent(2, {"k1": "w"}))
    for revision in range(2, 3000):  # many small commits of the same key: compacted
        await store.commit("s", revision, {"k1": str(revision)})
    loaded = await FileStateStore(tmp_path).load("s")
    assert loaded is not None
    assert (loaded.revision, loaded.state["k1"], loaded.intent) == (2999, "2999", None)
    assert store.path("s").stat().st_size < 40_000  # uncompacted: over 100 KB
