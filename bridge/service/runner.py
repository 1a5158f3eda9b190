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
from typing import TYPE_CHECKING, Any

import httpx

from bridge.service.config import BridgeConfig, LeaderElectionConfig, SourceConfig
from bridge.service.delivery import PublishedCallback, SourceLoop, SourceSpec
from bridge.sinks import Sink
from bridge.sources.http import DEFAULT_MAX_REDIRECTS, HttpPoller
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import LocalStore
from bridge.state import MemoryStateStore, StateStore
from bridge.watching import ExternalSource, WatchConfig

if TYPE_CHECKING:
    from bridge.ha.sharing import Coordinator

__all__ = ["Bridge", "build_sink", "build_source"]

log = logging.getLogger("bridge.service")


def build_source(config: SourceConfig) -> SourceSpec:
    """The poller a source config describes, with its name, schedule and URI."""
    source: ExternalSource
    if config.http is not None:
        http = config.http
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(http.timeout_s, connect=min(5.0, http.timeout_s)),
            verify=http.verify_tls,
            follow_redirects=True,
            max_redirects=DEFAULT_MAX_REDIRECTS,
        )
        poller = HttpPoller(http.url).with_name(config.name).with_client(client, owned=True)
        poller.with_max_body_bytes(http.max_body_bytes)
        for header, value in http.headers.items():
            poller.with_header(header, value.reveal())
        if http.bearer_token is not None:
            poller.with_bearer_token(http.bearer_token.reveal())
        source, uri = poller, http.url
    elif config.s3 is not None:
        from bridge.sources.stores.s3 import S3Store

        s3 = config.s3
        store = S3Store(
            s3.bucket,
            endpoint_url=s3.endpoint_url,
            region_name=s3.region,
            aws_access_key_id=s3.access_key_id.reveal() if s3.access_key_id else None,
            aws_secret_access_key=s3.secret_access_key.reveal() if s3.secret_access_key else None,
            aws_session_token=s3.session_token.reveal() if s3.session_token else None,
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
            replicas=broker.replicas,
            ack_timeout_s=broker.ack_timeout_s,
        )
        if broker.duplicate_window_s is not None:
            nats_config = replace(nats_config, duplicate_window_s=broker.duplicate_window_s)
        return NatsSink(nats_config)
    from bridge.sinks.redis import RedisSink, RedisSinkConfig

    redis_config = RedisSinkConfig(
        url=broker.url.reveal(),
        maxlen=broker.maxlen,
        content_mode=broker.content_mode,
        timeout_s=broker.ack_timeout_s,
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
    ) -> None:
        self.config = config
        self.replica = replica or replica_id()
        self.sink = sink or build_sink(config)
        self.state = state or build_state_store(config)
        self.on_published = on_published
        self.shutdown_grace_s = shutdown_grace_s
        self.specs = [build_source(source) for source in config.sources]
        self.loops: dict[str, SourceLoop] = {}
        self.coordinator: Coordinator | None = None
        if config.leader_election is not None:
            self.coordinator = self._coordinator(config.leader_election)
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then stop within about ``shutdown_grace_s``."""
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            if not await self._connect(stop):
                return
            if self.config.leader_election is not None:
                await self._run_elected(stop)
                return
            for spec in self.specs:
                loop = SourceLoop(spec, self.sink, self.state, on_published=self.on_published)
                self.loops[spec.name] = loop
                tasks[spec.name] = asyncio.create_task(loop.run(), name=f"source:{spec.name}")
                tasks[spec.name].add_done_callback(_log_death)
            log.info("publishing %d source(s) to %s", len(tasks), self.sink.description)
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([stopper, *tasks.values()], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
        finally:
            await self._shutdown(tasks)

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
            try:
                await self.sink.connect()
            except Exception as exc:
                log.warning(
                    "broker %s unavailable, retrying in %.1fs: %s",
                    self.sink.description,
                    delay,
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 30.0)
            else:
                self.connected.set()
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
        for spec in self.specs:
            await _aclose(spec.source)
        await _aclose(self.sink)
        await _aclose(self.state)

    def _coordinator(self, election: LeaderElectionConfig) -> Coordinator:
        import redis.asyncio as aioredis

        from bridge.ha.sharing import Coordinator

        timeout_s = max(0.5, election.lease_ttl_s / 4)
        client = aioredis.from_url(
            election.redis_url.reveal(), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
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
