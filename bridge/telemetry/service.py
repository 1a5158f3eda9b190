"""``Telemetry``: the traces, metrics, readiness and operations server of one bridge.

It knows nothing of the service: the :class:`~bridge.service.runner.Bridge` registers its
readiness checks (``telemetry.readiness.add``) and sets its gauges itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from bridge.subjects import REDIS_STREAM_PREFIX, redis_stream_key
from bridge.telemetry.health import HealthServer, Readiness
from bridge.telemetry.hooks import PublishTarget, SourceTelemetry
from bridge.telemetry.metrics import Metrics
from bridge.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from bridge.service.config import BridgeConfig, BrokerConfig, ServerConfig

__all__ = ["Telemetry", "broker_ready", "publish_target"]

log = logging.getLogger("bridge.telemetry")


class Telemetry:
    """What a :class:`~bridge.service.runner.Bridge` reports; built from its config's
    ``tracing`` and ``server`` sections by :meth:`from_config`."""

    def __init__(
        self,
        *,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        server: ServerConfig | None = None,
        broker: BrokerConfig | None = None,
    ) -> None:
        self.tracing = tracing or Tracing()
        self.metrics = metrics or Metrics()
        self.readiness = Readiness()
        self.server_config = server
        self.server: HealthServer | None = None
        self.broker = broker
        self._sources: dict[str, SourceTelemetry] = {}

    @classmethod
    def from_config(
        cls, config: BridgeConfig, *, tracer_provider: trace.TracerProvider | None = None
    ) -> Telemetry:
        """From ``config``; ``tracer_provider`` (one the caller owns) replaces the config's
        ``tracing`` section."""
        if tracer_provider is not None:
            tracing = Tracing(tracer_provider)
        else:
            tracing = Tracing.from_config(config.tracing)
        return cls(tracing=tracing, server=config.server, broker=config.broker)

    def source(self, name: str) -> SourceTelemetry:
        """The hooks of source ``name`` (one object per name)."""
        hooks = self._sources.get(name)
        if hooks is None:
            target = publish_target(self.broker, name) if self.broker is not None else None
            hooks = self._sources[name] = SourceTelemetry(
                name,
                tracer=self.tracing.tracer,
                metrics=self.metrics.source(name),
                target=target,
            )
        return hooks

    async def start(self) -> None:
        """Start the operations server, if the config has a ``server`` section."""
        config = self.server_config
        if config is None or self.server is not None:
            return
        server = HealthServer(
            config.host, config.port, self.readiness, self.metrics if config.metrics else None
        )
        await server.start()
        self.server = server

    async def aclose(self) -> None:
        """Stop the server; flush and stop the tracer provider this object created."""
        server, self.server = self.server, None
        if server is not None:
            await server.aclose()
        if self.tracing.enabled:
            try:
                await asyncio.to_thread(self.tracing.shutdown)
            except Exception:
                log.exception("flushing traces failed")


def publish_target(broker: BrokerConfig, source: str) -> PublishTarget:
    """Messaging attributes of ``source``'s publishes to ``broker``."""
    if broker.kind == "nats":
        prefix = broker.subject_prefix
        attributes: dict[str, Any] = {
            "messaging.destination.template": f"{prefix}.{source}.{{item}}",
            "koprs.nats.stream": broker.stream,
        }
        return PublishTarget("nats", f"{prefix}.{source}.*", attributes)
    return PublishTarget("redis", redis_stream_key(source, REDIS_STREAM_PREFIX))


async def broker_ready(sink: object) -> bool:
    """Whether the sink's broker answers now: its ``ping()`` if it has one (the built-in
    sinks do), else True (a sink that cannot tell counts as connected once connected)."""
    ping = getattr(sink, "ping", None)
    if ping is None:
        return True
    return bool(await ping())
