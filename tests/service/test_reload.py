"""Config reload without a restart, against real nats-server and redis-server.

The config lives in a folder laid out like a mounted ConfigMap (``bridge.yaml`` is a symlink
into ``..data``, and an update swaps ``..data`` atomically, as the kubelet does), watched by
:class:`~bridge.service.reload.ConfigWatcher` as ``koprs-bridge run`` does. What reaches the
broker is read by a raw JetStream subscription on a subject prefix unique to the test.

Covered: a source added (its events arrive), changed (restarted from its checkpoint: no
re-``Added``), removed (a publish in flight completes first, then it is no longer polled; with
leader election its lease is released); a source that stays is never restarted (same loop
object, its step count only grows); an invalid file keeps the running config; changes to other
sections are reported as needing a restart; ``koprs-bridge run`` itself reloads its file.
Waits are on conditions; nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
import yaml
from nats.js.api import DeliverPolicy

from bridge.consumer.decoding import Envelope, decode_nats
from bridge.ha.keys import SourceKeys, as_text
from bridge.secrets import Secret
from bridge.service.config import BridgeConfig, load_config, parse_config
from bridge.service.reload import ConfigWatcher, plan_reload, run_with_reload
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from bridge.state import MemoryStateStore
from tests.support.httpserver import Documents

WAIT_S = 60.0
"""Bound of every wait on a condition (only a broken bridge reaches it)."""
REPO = Path(__file__).resolve().parents[2]
DOC = "app.json"


# -- a config folder like a mounted ConfigMap ------------------------------------------------


class ConfigMapVolume:
    """``<root>/bridge.yaml -> ..data/bridge.yaml``, ``..data -> ..<version>``; :meth:`write`
    puts a new version in place with an atomic rename of ``..data``, then removes the old."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir()
        self.path = root / "bridge.yaml"
        self._versions = 0

    def write(self, document: dict[str, Any] | str) -> None:
        text = document if isinstance(document, str) else yaml.safe_dump(document)
        self._versions += 1
        version = self.root / f"..{self._versions}"
        version.mkdir()
        (version / "bridge.yaml").write_text(text)
        data = self.root / "..data"
        previous = data.resolve() if data.is_symlink() else None
        swap = self.root / "..data_tmp"
        swap.symlink_to(version.name)
        os.replace(swap, data)
        if not self.path.is_symlink():
            self.path.symlink_to("..data/bridge.yaml")
        if previous is not None:
            shutil.rmtree(previous)


# -- what reaches the broker -----------------------------------------------------------------


@dataclass
class Events:
    """Events decoded from the broker, in arrival order."""

    prefix: str
    received: list[Envelope] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def seen(self, source: str) -> list[tuple[str, str]]:
        return [(e.kind, e.key) for e in self.received if e.source_name == source]

    async def add(self, envelope: Envelope) -> None:
        async with self.changed:
            self.received.append(envelope)
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(predicate)


@contextlib.asynccontextmanager
async def consume(nats_url: str, prefix: str) -> AsyncIterator[Events]:
    """Every event under ``prefix`` since the stream began (the stream must exist)."""
    events = Events(prefix)
    client = await nats.connect(nats_url)

    async def on_message(msg: Any) -> None:
        await events.add(decode_nats(msg.subject, msg.headers, msg.data, subject_prefix=prefix))

    subscription = await client.jetstream().subscribe(
        f"{prefix}.>", cb=on_message, deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
    )
    try:
        yield events
    finally:
        await subscription.unsubscribe()
        await client.close()


# -- the service under test ------------------------------------------------------------------


@dataclass
class Setup:
    """One test's broker namespace, sources and config folder."""

    nats_url: str
    tmp_path: Path
    docs: Documents
    redis_url: str | None = None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def __post_init__(self) -> None:
        self.volume = ConfigMapVolume(self.tmp_path / "config")
        self.prefix = f"reload{self.tag}"
        self.stream = f"RELOAD_{self.tag}"
        self.folder = self.tmp_path / "files"
        self.folder.mkdir()

    def config(self, *sources: dict[str, Any], **extra: Any) -> dict[str, Any]:
        document: dict[str, Any] = {
            "broker": {"url": self.nats_url, "stream": self.stream, "subject_prefix": self.prefix},
            "sources": list(sources),
            **extra,
        }
        if self.redis_url is not None:
            document["leader_election"] = {
                "redis_url": self.redis_url,
                "lease_ttl": 2,
                "renew_every": 0.1,
            }
        return document

    def doc(self, interval: float = 0.05) -> dict[str, Any]:
        return {
            "name": "doc",
            "interval": interval,
            "max_backoff": 0.2,
            "http": {"url": self.docs.url(DOC)},
        }

    def files(self, interval: float = 0.05) -> dict[str, Any]:
        return {"name": "files", "interval": interval, "local": {"path": str(self.folder)}}


@contextlib.asynccontextmanager
async def running(setup: Setup) -> AsyncIterator[tuple[Bridge, ConfigWatcher, Events]]:
    """The bridge as ``koprs-bridge run`` runs it: watched config file, reloads applied."""
    watcher = ConfigWatcher(setup.volume.path, interval_s=0.05, env={})
    bridge = Bridge(load_config(setup.volume.path, env={}), shutdown_grace_s=1, replica="r1")
    stop = asyncio.Event()
    task = asyncio.create_task(run_with_reload(bridge, watcher, stop))
    try:
        async with asyncio.timeout(WAIT_S):
            await bridge.connected.wait()
        async with consume(setup.nats_url, setup.prefix) as events:
            yield bridge, watcher, events
    finally:
        stop.set()
        await task


async def reloaded(watcher: ConfigWatcher, count: int) -> None:
    async with asyncio.timeout(WAIT_S):
        await watcher.wait_until(lambda: watcher.reloads >= count)


async def steps(bridge: Bridge, name: str, more: int = 2) -> None:
    """Wait until source ``name`` has done ``more`` further rounds."""
    loop = bridge.loops[name] if bridge.coordinator is None else bridge.coordinator.led[name].loop
    async with asyncio.timeout(WAIT_S):
        await loop.wait_for_steps(loop.steps + more)


@pytest.fixture
def docs() -> Any:
    with Documents() as documents:
        documents.set(DOC, b'{"v": 1}')
        yield documents


# -- plans (no servers) ----------------------------------------------------------------------


def _parse(document: dict[str, Any]) -> BridgeConfig:
    return parse_config(document, env={})


def test_plan_matches_sources_by_name_and_compares_every_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELOAD_TEST_TOKEN", "t1")
    broker = {"url": "nats://127.0.0.1:4222"}

    def http(name: str, token: Any = "inline-secret", **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "interval": 1,
            "http": {"url": f"http://127.0.0.1/{name}", "bearer_token": token, **more},
        }

    local = {"name": "local", "interval": 1, "local": {"path": str(tmp_path)}}
    running_ = _parse(
        {
            "broker": broker,
            "sources": [http("same"), http("env", {"env": "RELOAD_TEST_TOKEN"}), local],
        }
    )
    same = _parse(
        {
            "broker": broker,
            "sources": [local, http("same"), http("env", {"env": "RELOAD_TEST_TOKEN"})],
        }
    )
    plan = plan_reload(running_, same)  # secrets compare by value, order does not matter
    assert (plan.added, plan.removed, plan.changed) == ((), (), ())
    assert plan.unchanged == ("local", "same", "env")
    assert not plan.sources_changed
    assert not plan.restart_required
    assert isinstance(running_.sources[0].http and running_.sources[0].http.bearer_token, Secret)

    monkeypatch.setenv("RELOAD_TEST_TOKEN", "t2")
    new = _parse(
        {
            "broker": {**broker, "content_mode": "structured"},
            "sources": [
                http("same", "another-secret"),
                http("env", {"env": "RELOAD_TEST_TOKEN"}),
                http("new"),
            ],
            "server": {"port": 9000},
        }
    )
    plan = plan_reload(running_, new)
    assert plan.added == ("new",)
    assert plan.removed == ("local",)
    assert plan.changed == ("same", "env")
    assert plan.restart_required == ("broker", "server")
    assert plan.describe() == "added new; removed local; changed same, env; 0 unchanged"
    assert "another-secret" not in repr(plan)


# -- one replica -----------------------------------------------------------------------------


async def test_single_replica_adds_changes_and_removes_sources_without_restart(
    nats_url: str, tmp_path: Path, docs: Documents, caplog: pytest.LogCaptureFixture
) -> None:
    setup = Setup(nats_url, tmp_path, docs)
    url = docs.url(DOC)
    (setup.folder / "a.txt").write_text("a")
    setup.volume.write(setup.config(setup.doc()))
    async with running(setup) as (bridge, watcher, events):
        await events.wait_for(lambda: events.seen("doc") == [("added", url)])
        doc_loop = bridge.loops["doc"]

        # added: its events arrive; the source that stays is not restarted
        setup.volume.write(setup.config(setup.doc(), setup.files()))
        await reloaded(watcher, 1)
        await events.wait_for(lambda: events.seen("files") == [("added", "a.txt")])
        assert bridge.loops["doc"] is doc_loop
        await steps(bridge, "doc")
        docs.set(DOC, b'{"v": 2}')
        await events.wait_for(lambda: len(events.seen("doc")) == 2)
        assert events.seen("doc") == [("added", url), ("modified", url)]  # no re-Added

        # changed: stopped, started again from its checkpoint
        files_loop = bridge.loops["files"]
        revision = files_loop.revision
        setup.volume.write(setup.config(setup.doc(), setup.files(interval=0.06)))
        await reloaded(watcher, 2)
        assert bridge.loops["files"] is not files_loop
        assert bridge.loops["doc"] is doc_loop
        await steps(bridge, "files")
        assert bridge.loops["files"].revision == revision  # resumed, nothing new to publish
        assert bridge.config.sources[1].interval_s == 0.06
        (setup.folder / "b.txt").write_text("b")
        await events.wait_for(lambda: len(events.seen("files")) == 2)
        assert events.seen("files") == [("added", "a.txt"), ("added", "b.txt")]

        # removed: no longer polled
        setup.volume.write(setup.config(setup.files(interval=0.06)))
        await reloaded(watcher, 3)
        assert set(bridge.loops) == {"files"}
        polled = len(docs.requests(DOC))
        docs.set(DOC, None)
        (setup.folder / "c.txt").write_text("c")
        await events.wait_for(lambda: len(events.seen("files")) == 3)
        await steps(bridge, "files", 3)
        assert len(docs.requests(DOC)) == polled
        assert events.seen("doc") == [("added", url), ("modified", url)]

        # invalid: logged with the precise message, the running config stays
        files_loop = bridge.loops["files"]
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="bridge.reload"):
            setup.volume.write(
                setup.config({"name": "files", "interval": "soon", "local": {"path": "/"}})
            )
            async with asyncio.timeout(WAIT_S):
                await watcher.wait_until(lambda: watcher.rejected >= 1)
        assert watcher.last_error is not None
        assert "sources[0].interval" in watcher.last_error
        assert str(setup.volume.path) in watcher.last_error
        assert any(
            "keeping the running config" in r.getMessage()
            and "sources[0].interval" in r.getMessage()
            for r in caplog.records
        )
        assert bridge.loops["files"] is files_loop
        await steps(bridge, "files")
        (setup.folder / "d.txt").write_text("d")
        await events.wait_for(lambda: len(events.seen("files")) == 4)

        # sections that need a restart: reported, sources untouched, still running
        with caplog.at_level(logging.WARNING, logger="bridge.service"):
            setup.volume.write(setup.config(setup.files(interval=0.06), server={"port": 0}))
            await reloaded(watcher, 4)
        assert any("only after a restart" in r.getMessage() for r in caplog.records)
        assert any("server" in r.getMessage() for r in caplog.records)
        assert bridge.loops["files"] is files_loop
        assert bridge.config.server is None  # still the running one
        await steps(bridge, "files")
    assert watcher.reloads == 4
    assert watcher.rejected == 1


async def test_removed_source_finishes_its_publish_in_flight(tmp_path: Path) -> None:
    """Removal stops a source like a shutdown does: a publish in progress is not cut off, it
    completes and its state is committed before :meth:`Bridge.reload` returns."""
    for name in ("keep", "gone"):
        (tmp_path / name).mkdir()
    (tmp_path / "gone" / "a.txt").write_text("a")

    def source(name: str) -> dict[str, Any]:
        return {"name": name, "interval": 0.05, "local": {"path": str(tmp_path / name)}}

    broker = {"url": "nats://127.0.0.1:1"}
    sink, state = MemorySink(), MemoryStateStore()
    bridge = Bridge(
        parse_config({"broker": broker, "sources": [source("keep"), source("gone")]}, env={}),
        sink=sink,
        state=state,
        shutdown_grace_s=WAIT_S,
        replica="r1",
    )
    sink.block()
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        async with asyncio.timeout(WAIT_S):
            await sink.wait_for_calls(1)  # the publish of gone's a.txt is in flight
        gone = bridge.loops["gone"]
        assert gone.busy
        stop_loop = gone.stop
        stopped_busy: list[bool] = []

        def stop_then_let_the_publish_finish() -> None:
            stop_loop()
            stopped_busy.append(gone.busy)
            sink.unblock()  # a cancelled publish would never store its event

        gone.stop = stop_then_let_the_publish_finish  # type: ignore[method-assign]
        new = parse_config({"broker": broker, "sources": [source("keep")]}, env={})
        async with asyncio.timeout(WAIT_S):
            plan = await bridge.reload(new)
        assert stopped_busy == [True]
        assert plan.removed == ("gone",)
        assert [e.subject for e in sink.events("gone")] == ["a.txt"]
        checkpoint = await state.load("gone")
        assert checkpoint is not None
        assert checkpoint.intent is None
        assert list(checkpoint.state) == ["a.txt"]
        assert gone.revision == checkpoint.revision
        assert set(bridge.loops) == {"keep"}
        scrape = bridge.telemetry.metrics.render().decode()
        assert 'source="keep"' in scrape
        assert 'source="gone"' not in scrape  # its series went with it
    finally:
        sink.unblock()
        stop.set()
        await task


async def test_reload_of_an_unchanged_file_content_does_nothing(
    nats_url: str, tmp_path: Path, docs: Documents
) -> None:
    setup = Setup(nats_url, tmp_path, docs)
    document = setup.config(setup.doc())
    setup.volume.write(document)
    async with running(setup) as (bridge, watcher, events):
        await events.wait_for(lambda: len(events.seen("doc")) == 1)
        loop = bridge.loops["doc"]
        setup.volume.write(document)  # a new version with the same bytes
        checks = watcher.checks
        async with asyncio.timeout(WAIT_S):
            await watcher.wait_until(lambda: watcher.checks >= checks + 2)
        assert watcher.reloads == 0
        assert bridge.loops["doc"] is loop


# -- leader election -------------------------------------------------------------------------


async def test_elected_replica_competes_for_added_sources_and_releases_removed_ones(
    nats_url: str, redis_url: str, tmp_path: Path, docs: Documents
) -> None:
    setup = Setup(nats_url, tmp_path, docs, redis_url=redis_url)
    url = docs.url(DOC)
    (setup.folder / "a.txt").write_text("a")
    setup.volume.write(setup.config(setup.files()))
    client = aioredis.from_url(redis_url)
    try:
        async with running(setup) as (bridge, watcher, events):
            coordinator = bridge.coordinator
            assert coordinator is not None
            await events.wait_for(lambda: events.seen("files") == [("added", "a.txt")])
            files_led = coordinator.led["files"]

            # added: led at once (within this replica's share), its events arrive
            setup.volume.write(setup.config(setup.files(), setup.doc()))
            await reloaded(watcher, 1)
            assert set(coordinator.led) == {"files", "doc"}
            assert coordinator.led["files"] is files_led
            await events.wait_for(lambda: events.seen("doc") == [("added", url)])
            holder = as_text(await client.get(SourceKeys("doc").lease))
            assert holder == f"r1|{coordinator.led['doc'].lease.fence}"

            # changed: loop restarted under a new lease, resuming from the Redis checkpoint
            doc_led = coordinator.led["doc"]
            revision = doc_led.loop.revision
            setup.volume.write(setup.config(setup.files(), setup.doc(interval=0.06)))
            await reloaded(watcher, 2)
            assert coordinator.led["doc"] is not doc_led
            assert doc_led.task.done()
            assert coordinator.led["doc"].lease.fence > doc_led.lease.fence
            assert coordinator.led["files"] is files_led
            await steps(bridge, "doc")
            assert coordinator.led["doc"].loop.revision == revision
            docs.set(DOC, b'{"v": 2}')
            await events.wait_for(lambda: len(events.seen("doc")) == 2)
            assert events.seen("doc") == [("added", url), ("modified", url)]

            # removed: loop stopped, lease released, not competed for any more
            setup.volume.write(setup.config(setup.doc(interval=0.06)))
            await reloaded(watcher, 3)
            assert set(coordinator.led) == {"doc"}
            assert files_led.task.done()
            assert await client.get(SourceKeys("files").lease) is None
            (setup.folder / "b.txt").write_text("b")
            async with asyncio.timeout(WAIT_S):
                await coordinator.wait_for_rounds(coordinator.rounds + 3)
            await steps(bridge, "doc")
            assert "files" not in coordinator.led
            assert await client.get(SourceKeys("files").lease) is None
            assert events.seen("files") == [("added", "a.txt")]
    finally:
        await client.aclose()


async def test_two_replicas_share_the_sources_of_a_reloaded_config(
    nats_url: str, redis_url: str, tmp_path: Path, docs: Documents
) -> None:
    setup = Setup(nats_url, tmp_path, docs, redis_url=redis_url)
    folders = [setup.folder / f"s{i}" for i in range(4)]
    for folder in folders:
        folder.mkdir()
        (folder / "x").write_text(folder.name)

    def source(i: int) -> dict[str, Any]:
        return {"name": f"s{i}", "interval": 0.05, "local": {"path": str(folders[i])}}

    setup.volume.write(setup.config(source(0)))
    watchers = [ConfigWatcher(setup.volume.path, interval_s=0.05, env={}) for _ in range(2)]
    bridges = [
        Bridge(load_config(setup.volume.path, env={}), shutdown_grace_s=1, replica=r)
        for r in ("r1", "r2")
    ]
    coordinators = [b.coordinator for b in bridges]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_with_reload(b, w, stop))
        for b, w in zip(bridges, watchers, strict=True)
    ]

    async def shared(expected: set[str]) -> None:
        """Wait (round by round) until the replicas lead ``expected`` between them, fairly."""
        async with asyncio.timeout(WAIT_S):
            while True:
                led = [set(c.led) for c in coordinators if c is not None]
                fair = max(map(len, led)) <= -(-len(expected) // 2)
                if set().union(*led) == expected and sum(map(len, led)) == len(expected) and fair:
                    return
                for c in coordinators:
                    assert c is not None
                    await c.wait_for_rounds(c.rounds + 1)

    try:
        await shared({"s0"})
        setup.volume.write(setup.config(*(source(i) for i in range(4))))
        for w in watchers:
            await reloaded(w, 1)
        await shared({"s0", "s1", "s2", "s3"})
        async with consume(nats_url, setup.prefix) as events:
            names = ["s0", "s1", "s2", "s3"]
            await events.wait_for(
                lambda: sorted(e.source_name or "" for e in events.received) == names
            )
        setup.volume.write(setup.config(source(1), source(3)))
        for w in watchers:
            await reloaded(w, 2)
        await shared({"s1", "s3"})
        client = aioredis.from_url(redis_url)
        try:
            for name in ("s0", "s2"):
                assert await client.get(SourceKeys(name).lease) is None
        finally:
            await client.aclose()
    finally:
        stop.set()
        await asyncio.gather(*tasks)


# -- the command -----------------------------------------------------------------------------


async def test_run_command_reloads_its_config_file(
    nats_url: str, tmp_path: Path, docs: Documents
) -> None:
    setup = Setup(nats_url, tmp_path, docs)
    (setup.folder / "a.txt").write_text("a")
    setup.volume.write(setup.config(setup.files()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOPRS_BRIDGE")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "run",
        "--config",
        str(setup.volume.path),
        "--reload-interval",
        "0.05",
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    logged = asyncio.Condition()

    async def read_log() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            async with logged:
                lines.append(raw.decode(errors="replace").rstrip())
                logged.notify_all()

    async def log_line(text: str) -> None:
        async with asyncio.timeout(WAIT_S), logged:
            await logged.wait_for(lambda: any(text in line for line in lines))

    reader = asyncio.create_task(read_log())
    try:
        await log_line("publishing 1 source(s)")
        async with consume(nats_url, setup.prefix) as events:
            await events.wait_for(lambda: events.seen("files") == [("added", "a.txt")])
            setup.volume.write(setup.config(setup.files(), setup.doc()))
            await events.wait_for(lambda: events.seen("doc") == [("added", docs.url(DOC))])
            await log_line("reloaded: added doc; 1 unchanged")
            setup.volume.write("sources: []\n")
            await log_line("keeping the running config")
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await process.wait() == 0, "\n".join(lines)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await reader
