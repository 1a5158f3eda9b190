"""The service's supervisor: run every source of a config against one sink.

The parts are built by :mod:`bridge.service.factories` (re-exported here: ``build_source``,
``build_sink``); the bridge registers its readiness checks (config, broker, leader election)
with its :class:`~bridge.telemetry.Telemetry`.

Each source runs in its own :class:`~bridge.service.delivery.SourceLoop` task, on its own
schedule. The sink is connected first (retried with backoff while the broker is down).
:meth:`Bridge.run` returns when ``stop`` is set: idle sources stop at once, a source in the
middle of a publish gets ``shutdown_grace_s`` to finish it, then everything is cancelled —
safe, because state is only committed after acknowledgements.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any, Literal

from bridge import aio
from bridge.aio import Backoff
from bridge.service.config import BridgeConfig, LeaderElectionConfig, SourceConfig
from bridge.service.delivery import PublishedCallback, SourceLoop, SourceSpec, stop_loops
from bridge.service.factories import build_sink, build_source, build_state_store, replica_id
from bridge.sinks import Sink
from bridge.sources.http import HttpClients
from bridge.state import MemoryStateStore, StateStore
from bridge.state.recovery import PublishedReader
from bridge.telemetry import Telemetry
from bridge.telemetry.service import broker_ready
from bridge.watching import Lag, start_offset_s

if TYPE_CHECKING:
    from bridge.ha.sharing import Coordinator
    from bridge.service.reload import ReloadPlan

__all__ = ["Bridge", "build_sink", "build_source"]  # the factories: bridge.service.factories

log = logging.getLogger("bridge.service")

REDIS_POOL_CONNECTIONS = 32
"""Connections of the leader election's Redis pool (checkpoint loads and fenced writes)."""


class Bridge:
    """Runs every configured source against one sink."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        sink: Sink | None = None,
        state: StateStore | None = None,
        on_published: PublishedCallback | None = None,
        shutdown_grace_s: float = 5.0,
        replica: str | None = None,
        telemetry: Telemetry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.rng = rng
        """The schedules' random source (tick and retry jitter); tests pin it."""
        self.replica = replica or replica_id()
        self.sink = sink or build_sink(config)
        self.state = state or build_state_store(config)
        self.on_published = on_published
        self.shutdown_grace_s = shutdown_grace_s
        self.http_clients = HttpClients(max_connections=config.max_concurrent_polls)
        """The HTTP clients the HTTP sources share, one per origin (a source's ``aclose()``
        gives its client up, the last one closing it)."""
        self.specs = [build_source(source, self.http_clients) for source in config.sources]
        self.telemetry = telemetry or Telemetry.from_config(config)
        """Traces, metrics, readiness and the ``/healthz``-``/readyz``-``/metrics`` server."""
        self._track()
        metrics = self.telemetry.metrics
        self.slots = asyncio.Semaphore(config.max_concurrent_polls)
        """Steps of all sources in flight at once (``max_concurrent_polls``)."""
        self.lag = Lag(metrics.schedule_lag.observe, metrics.schedule_missed_ticks.inc)
        self.loops: dict[str, SourceLoop] = {}
        self.coordinator: Coordinator | None = None
        if config.leader_election is not None:
            self.coordinator = self._coordinator(config.leader_election)
        self.connected = asyncio.Event()
        self.started = asyncio.Event()
        """Set once every source's loop runs (single replica: :attr:`loops` is complete)."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_lock = asyncio.Lock()
        self._phase: Literal["new", "running", "closed"] = "new"
        self._source_ended = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then stop within about ``shutdown_grace_s``."""
        await self.telemetry.start()  # /healthz answers (and /readyz says why not) at once
        if isinstance(self.state, MemoryStateStore) and self.config.leader_election is None:
            if isinstance(self.sink, PublishedReader):
                log.info(
                    "source state is kept in memory only (no state.path): each start rebuilds "
                    "it from what %s holds (recovery from the broker)",
                    self.sink.description,
                )
            else:
                log.warning(
                    "source state is kept in memory only (no state.path): a restart publishes "
                    "every item again as Added, under new event ids; set state.path to keep it"
                )
        try:
            if not await self._connect(stop):
                return
            if self.config.leader_election is not None:
                await self._run_elected(stop)
                return
            async with self._reload_lock:
                for spec in self.specs:
                    self._start_source(spec)
                self._phase = "running"
                self.started.set()
            log.info("publishing %d source(s) to %s", len(self._tasks), self.sink.description)
            await self._supervise(stop)
        finally:
            async with self._reload_lock:
                self._phase = "closed"
                await self._shutdown(self._tasks)

    def _start_source(self, spec: SourceSpec) -> None:
        loop = SourceLoop(
            spec,
            self.sink,
            self.state,
            on_published=self.on_published,
            telemetry=self.telemetry.source(spec.name),
            slots=self.slots,
            lag=self.lag,
            offset_s=start_offset_s(spec.name, spec.watch.interval, len(self.specs)),
            rng=self.rng,
        )
        self.loops[spec.name] = loop
        task = asyncio.create_task(loop.run(), name=f"source:{spec.name}")
        task.add_done_callback(_log_death)
        task.add_done_callback(lambda _: self._source_ended.set())
        self._tasks[spec.name] = task

    async def _stop_source(self, name: str) -> None:
        """Stop one source's loop: a step in progress (a publish) finishes, within the grace."""
        running = (self.loops.pop(name), self._tasks.pop(name))
        await stop_loops([running], self.shutdown_grace_s, on_late=self._abandoned)

    def _abandoned(self, task: asyncio.Task[None]) -> None:
        log.warning(
            "%s did not finish within %.1fs; abandoning it (its changes will be re-derived)",
            task.get_name(),
            self.shutdown_grace_s,
        )

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set or a running source's loop ended by itself."""
        relay = asyncio.create_task(stop.wait())
        relay.add_done_callback(lambda _: self._source_ended.set())
        try:
            while not stop.is_set():
                await self._source_ended.wait()
                self._source_ended.clear()
                if any(task.done() for task in self._tasks.values()):
                    return
        finally:
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)

    async def reload(self, config: BridgeConfig) -> ReloadPlan:
        """Apply ``config``'s sources without a restart; return what changed.

        Sources are matched by name. Removed: the loop stops (a publish in flight finishes,
        within ``shutdown_grace_s``) and, with leader election, its lease is released. Added:
        started. Changed (any field differs): stopped, then started again with the same state
        store, so it resumes from its checkpoint. Unchanged: untouched. Other sections
        (``broker``, ``leader_election``, ``state``, ``server``, ...) need a restart: their
        changes are logged and ignored (:attr:`ReloadPlan.restart_required`).
        """
        from bridge.service.reload import plan_reload

        async with self._reload_lock:
            plan = plan_reload(self.config, config)
            if plan.restart_required:
                log.warning(
                    "config %s: changes to %s take effect only after a restart; "
                    "running on with the current ones",
                    config.origin,
                    ", ".join(plan.restart_required),
                )
            if self._phase == "closed" or not plan.sources_changed:
                if not plan.sources_changed:
                    log.info("config %s reloaded: sources unchanged", config.origin)
                return plan
            old = {spec.name: spec for spec in self.specs}
            # Built first: a source that cannot be built leaves everything as it was (and
            # sources still running keep their shared HTTP clients, connections included).
            fresh = await self._build_sources(
                [s for s in config.sources if s.name in plan.added or s.name in plan.changed]
            )
            specs = [fresh.get(source.name) or old[source.name] for source in config.sources]
            retired = [old[name] for name in (*plan.removed, *plan.changed)]
            if self.coordinator is not None:
                await self.coordinator.update(specs)
            elif self._phase == "running":
                await asyncio.gather(
                    *(self._stop_source(spec.name) for spec in retired if spec.name in self._tasks)
                )
            for spec in retired:
                await _aclose(spec.source)
            for name in plan.removed:
                self.telemetry.metrics.forget(name)
            self.specs = specs
            self.config = self.config.model_copy(update={"sources": config.sources})
            if self.coordinator is None and self._phase == "running":
                for spec in specs:
                    if spec.name not in self._tasks:
                        self._start_source(spec)
            log.info("config %s reloaded: %s", config.origin, plan.describe())
            return plan

    async def _build_sources(self, sources: list[SourceConfig]) -> dict[str, SourceSpec]:
        """The specs of ``sources``, by name; if one cannot be built, none is (those built
        already are closed: they give their shared HTTP clients up) and the error is raised."""
        built: dict[str, SourceSpec] = {}
        try:
            for source in sources:
                built[source.name] = build_source(source, self.http_clients)
        except BaseException:
            for spec in built.values():
                await _aclose(spec.source)
            raise
        return built

    async def _run_elected(self, stop: asyncio.Event) -> None:
        """Several replicas: lead only the sources whose leases this replica holds."""
        assert self.coordinator is not None
        assert self.config.leader_election is not None
        log.info(
            "replica %s competing for %d source(s) (lease TTL %.1fs)",
            self.replica,
            len(self.specs),
            self.config.leader_election.lease_ttl_s,
        )
        try:
            await self.coordinator.run(stop)
        finally:
            await self.coordinator.redis.aclose()

    async def _connect(self, stop: asyncio.Event) -> bool:
        backoff = Backoff(0.5, 30.0)
        while not stop.is_set():
            what = f"broker {self.sink.description}"
            try:
                await self.sink.connect()
                if self.coordinator is not None:  # ready only once both answer
                    what = f"leader election Redis {self.coordinator_description}"
                    await self._ping_election()
            except Exception as exc:
                delay = backoff.next()
                log.warning("%s unavailable, retrying in %.1fs: %s", what, delay, exc)
                await aio.sleep(delay, stop)
            else:
                self.connected.set()
                self.telemetry.metrics.broker_connected.set(1)
                return True
        return False

    async def _shutdown(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        running = [(self.loops[name], task) for name, task in tasks.items()]
        await stop_loops(running, self.shutdown_grace_s, on_late=self._abandoned)
        tasks.clear()
        for spec in self.specs:
            await _aclose(spec.source)
        await _aclose(self.sink)
        await _aclose(self.state)
        await self.telemetry.aclose()

    @property
    def coordinator_description(self) -> str:
        """The leader election's Redis, its password hidden ("" without election)."""
        from bridge.secrets import redact_url

        election = self.config.leader_election
        return redact_url(election.redis_url.reveal()) if election is not None else ""

    async def _ping_election(self) -> None:
        import redis.exceptions

        from bridge.connections import describe_error
        from bridge.errors import StateError

        assert self.coordinator is not None
        try:
            await self.coordinator.redis.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StateError(f"cannot connect: {describe_error(exc)}") from exc

    def _coordinator(self, election: LeaderElectionConfig) -> Coordinator:
        from bridge.connections import redis_client
        from bridge.ha.replication import Replication
        from bridge.ha.sharing import Coordinator

        timeout_s = max(0.5, election.lease_ttl_s / 4)
        client = redis_client(
            election.redis_url.reveal(),
            election.tls,
            election.auth,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # State writes wait for a connection rather than fail when all are busy; the
            # heartbeats have a connection of their own (Coordinator.control).
            max_connections=REDIS_POOL_CONNECTIONS,
            pool_timeout_s=election.lease_ttl_s,
        )
        return Coordinator(
            self.specs,
            self.sink,
            client,
            replica=self.replica,
            lease_ttl_s=election.lease_ttl_s,
            renew_every_s=election.renew_every_s,
            on_published=self.on_published,
            shutdown_grace_s=self.shutdown_grace_s,
            telemetry=self.telemetry,
            slots=self.slots,
            lag=self.lag,
            rng=self.rng,
            replication=Replication(election.replicas_to_wait_for, timeout_s / 2),
        )

    def _track(self) -> None:
        """Register this bridge's readiness checks and gauges with its telemetry: the config
        is loaded, the broker connected and, with leader election, its Redis reachable. Read
        when asked, so they follow a sink or coordinator replaced later."""
        metrics = self.telemetry.metrics

        async def config_loaded() -> bool:
            return self.config is not None

        async def broker() -> bool:
            ok = self.connected.is_set() and await broker_ready(self.sink)
            metrics.broker_connected.set(1 if ok else 0)
            return ok

        self.telemetry.readiness.add("config", config_loaded)
        self.telemetry.readiness.add("broker", broker)
        if self.config.leader_election is None:
            return
        for spec in self.specs:
            metrics.source(spec.name).set_lease_held(False)

        async def leader_election() -> bool:
            coordinator = self.coordinator
            ok = False
            if coordinator is not None:
                try:
                    ok = bool(await coordinator.redis.ping())
                except Exception:
                    ok = False
            metrics.leader_election_connected.set(1 if ok else 0)
            return ok

        self.telemetry.readiness.add("leader_election", leader_election)

    def status(self) -> dict[str, Any]:
        if self.coordinator is not None:
            return self.coordinator.status()
        return {"leading": {name: loop.status() for name, loop in self.loops.items()}}


async def _aclose(thing: object) -> None:
    close = getattr(thing, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.exception("closing %r failed", thing)


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s stopped unexpectedly", task.get_name(), exc_info=exc)
