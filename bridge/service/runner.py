"""The service: build sources, sink and state store from a config and run every source.

Each source runs in its own :class:`~bridge.service.delivery.SourceLoop` task, on its own
schedule. The sink is connected first (retried with backoff while the broker is down).
:meth:`Bridge.run` returns when ``stop`` is set: idle sources stop at once, a source in the
middle of a publish gets ``shutdown_grace_s`` to finish it, then everything is cancelled —
safe, because state is only committed after acknowledgements.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx

from bridge.service.config import BridgeConfig, LeaderElectionConfig, SourceConfig
from bridge.service.delivery import PublishedCallback, SourceLoop, SourceSpec
from bridge.sinks import Sink
from bridge.sources.http import HttpPoller, tls_context
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import LocalStore
from bridge.state import MemoryStateStore, StateStore
from bridge.telemetry import Telemetry
from bridge.watching import ExternalSource, WatchConfig

if TYPE_CHECKING:
    from bridge.ha.sharing import Coordinator
    from bridge.service.reload import ReloadPlan

__all__ = ["Bridge", "build_sink", "build_source"]

log = logging.getLogger("bridge.service")


def build_source(config: SourceConfig) -> SourceSpec:
    """The poller a source config describes, with its name, schedule and URI."""
    source: ExternalSource
    if config.http is not None:
        from bridge.errors import ConfigError

        http, tls = config.http, config.http.tls
        try:
            if tls is not None:
                verify = tls_context(
                    verify=tls.verify,
                    ca_file=tls.ca_file,
                    cert_file=tls.cert_file,
                    key_file=tls.key_file,
                )
            elif isinstance(http.verify_tls, str):
                verify = tls_context(ca_file=http.verify_tls)
            else:
                verify = tls_context(verify=http.verify_tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"source {config.name!r}: cannot load the TLS certificates of http.tls / "
                f"http.verify_tls: {exc}"
            ) from exc
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(http.timeout_s, connect=min(5.0, http.timeout_s)),
            verify=verify,
            follow_redirects=False,  # the poller follows redirects itself, by its own rules
        )
        poller = HttpPoller(http.url).with_name(config.name).with_client(client, owned=True)
        poller.with_max_body_bytes(http.max_body_bytes).with_max_redirects(http.max_redirects)
        poller.with_deadline(http.timeout_s)
        for header, value in http.headers.items():
            poller.with_header(header, value)  # Secrets: read again for every request
        if http.bearer_token is not None:
            poller.with_bearer_token(http.bearer_token)
        if http.basic_auth is not None:
            poller.with_basic_auth(http.basic_auth.username, http.basic_auth.password)
        if tls is not None and tls.server_name:
            poller.with_server_name(tls.server_name)
        source, uri = poller, http.url
    elif config.s3 is not None:
        from bridge.extras import require_extra

        require_extra("s3", f"source {config.name!r} (s3:)")
        from bridge.sources.stores.s3 import S3Store

        s3 = config.s3
        store = S3Store(
            s3.bucket,
            endpoint_url=s3.endpoint_url,
            region_name=s3.region,
            aws_access_key_id=s3.access_key_id,  # Secrets: read again for every request
            aws_secret_access_key=s3.secret_access_key,
            aws_session_token=s3.session_token,
            profile_name=s3.profile,
            role_arn=s3.role_arn,
            web_identity_token_file=s3.web_identity_token_file,
            sts_endpoint_url=s3.sts_endpoint_url,
        )
        source = ObjectStorePoller(store).with_prefix(s3.prefix).with_name(config.name)
        uri = f"s3://{s3.bucket}/{s3.prefix}"
    else:
        assert config.local is not None
        local = config.local
        if local.create:
            local.path.mkdir(parents=True, exist_ok=True)
        store_ = LocalStore(local.path)
        source = ObjectStorePoller(store_).with_prefix(local.prefix).with_name(config.name)
        uri = store_.uri + (f"/{local.prefix}" if local.prefix else "")
    watch = WatchConfig(config.interval_s, config.max_backoff_s)
    return SourceSpec(
        name=config.name,
        source=source,
        watch=watch,
        source_uri=uri,
        max_inline_body_bytes=config.inline_body_bytes,
    )


def build_sink(config: BridgeConfig) -> Sink:
    broker = config.broker
    if broker.kind == "nats":
        from bridge.sinks.nats import NatsSink, NatsSinkConfig

        nats_config = NatsSinkConfig(
            url=broker.url.reveal(),
            stream=broker.stream,
            subject_prefix=broker.subject_prefix,
            content_mode=broker.content_mode,
            max_age_s=broker.max_age_s,
            max_msgs_per_subject=broker.max_msgs_per_subject,
            replicas=broker.replicas or 1,
            ack_timeout_s=broker.ack_timeout_s,
            tls=broker.tls,
            auth=broker.auth,
        )
        if broker.duplicate_window_s is not None:
            nats_config = replace(nats_config, duplicate_window_s=broker.duplicate_window_s)
        return NatsSink(nats_config)
    from bridge.sinks.redis import RedisSink, RedisSinkConfig

    redis_config = RedisSinkConfig(
        url=broker.url.reveal(),
        maxlen=broker.maxlen,
        replicas=broker.replicas,
        content_mode=broker.content_mode,
        timeout_s=broker.ack_timeout_s,
        tls=broker.tls,
        auth=broker.auth,
    )
    if broker.duplicate_window_s is not None:
        redis_config = replace(redis_config, dedup_window_s=broker.duplicate_window_s)
    return RedisSink(redis_config)


def build_state_store(config: BridgeConfig) -> StateStore:
    if config.state_path is not None:
        from bridge.state.files import FileStateStore

        return FileStateStore(Path(config.state_path))
    return MemoryStateStore()


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
    ) -> None:
        self.config = config
        self.replica = replica or replica_id()
        self.sink = sink or build_sink(config)
        self.state = state or build_state_store(config)
        self.on_published = on_published
        self.shutdown_grace_s = shutdown_grace_s
        self.specs = [build_source(source) for source in config.sources]
        self.telemetry = telemetry or Telemetry.from_config(config)
        """Traces, metrics, readiness and the ``/healthz``-``/readyz``-``/metrics`` server."""
        self.telemetry.track(self)
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
        )
        self.loops[spec.name] = loop
        task = asyncio.create_task(loop.run(), name=f"source:{spec.name}")
        task.add_done_callback(_log_death)
        task.add_done_callback(lambda _: self._source_ended.set())
        self._tasks[spec.name] = task

    async def _stop_source(self, name: str) -> None:
        """Stop one source's loop: a step in progress (a publish) finishes, within the grace."""
        task = self._tasks.pop(name)
        loop = self.loops.pop(name)
        loop.stop()
        if not loop.busy:
            task.cancel()
        done, _ = await asyncio.wait([task], timeout=self.shutdown_grace_s)
        if not done:
            log.warning(
                "%s did not finish within %.1fs; abandoning it (its changes will be re-derived)",
                task.get_name(),
                self.shutdown_grace_s,
            )
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

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
            fresh = {  # built first: a source that cannot be built leaves everything as it was
                source.name: build_source(source)
                for source in config.sources
                if source.name in plan.added or source.name in plan.changed
            }
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
            self.config = replace(self.config, sources=config.sources)
            if self.coordinator is None and self._phase == "running":
                for spec in specs:
                    if spec.name not in self._tasks:
                        self._start_source(spec)
            log.info("config %s reloaded: %s", config.origin, plan.describe())
            return plan

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
        delay = 0.5
        while not stop.is_set():
            what = f"broker {self.sink.description}"
            try:
                await self.sink.connect()
                if self.coordinator is not None:  # ready only once both answer
                    what = f"leader election Redis {self.coordinator_description}"
                    await self._ping_election()
            except Exception as exc:
                log.warning("%s unavailable, retrying in %.1fs: %s", what, delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 30.0)
            else:
                self.connected.set()
                self.telemetry.metrics.broker_connected.set(1)
                return True
        return False

    async def _shutdown(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        for name, task in tasks.items():
            loop = self.loops[name]
            loop.stop()
            if not loop.busy:
                task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks.values(), timeout=self.shutdown_grace_s)
            for task in late:
                log.warning(
                    "%s did not finish within %.1fs; abandoning it (its changes "
                    "will be re-derived)",
                    task.get_name(),
                    self.shutdown_grace_s,
                )
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
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
        from bridge.ha.sharing import Coordinator

        timeout_s = max(0.5, election.lease_ttl_s / 4)
        client = redis_client(
            election.redis_url.reveal(),
            election.tls,
            election.auth,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
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
        )

    def status(self) -> dict[str, Any]:
        if self.coordinator is not None:
            return self.coordinator.status()
        return {"leading": {name: loop.status() for name, loop in self.loops.items()}}


def replica_id() -> str:
    """``$KOPRS_BRIDGE_REPLICA_ID``, else ``$POD_NAME``, else ``<hostname>-<pid>``."""
    import os
    import socket

    return (
        os.environ.get("KOPRS_BRIDGE_REPLICA_ID")
        or os.environ.get("POD_NAME")
        or f"{socket.gethostname()}-{os.getpid()}"
    )


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
