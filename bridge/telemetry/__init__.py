"""Observability: OpenTelemetry traces, Prometheus metrics, health endpoints, JSON logs.

* :mod:`bridge.telemetry.tracing` — spans per poll and per published batch, the ``traceparent``
  of events, :func:`process_span` for consumers;
* :mod:`bridge.telemetry.metrics` — the ``koprs_bridge_*`` metrics, one registry per bridge;
* :mod:`bridge.telemetry.health` — ``/healthz``, ``/readyz``, ``/metrics`` on a tiny asyncio
  HTTP server;
* :mod:`bridge.telemetry.logs` — text or JSON log lines;
* :mod:`bridge.telemetry.hooks` — what the delivery loop calls around polls and publishes;
* :mod:`bridge.telemetry.service` — :class:`Telemetry`, all of it for one bridge.
"""

from bridge.telemetry.health import HealthServer, Readiness
from bridge.telemetry.hooks import PublishTarget, SourceTelemetry
from bridge.telemetry.logs import JsonFormatter, configure_logging
from bridge.telemetry.metrics import Metrics, SourceMetrics
from bridge.telemetry.service import Telemetry
from bridge.telemetry.tracing import Tracing, format_traceparent, process_span

__all__ = [
    "HealthServer",
    "JsonFormatter",
    "Metrics",
    "PublishTarget",
    "Readiness",
    "SourceMetrics",
    "SourceTelemetry",
    "Telemetry",
    "Tracing",
    "configure_logging",
    "format_traceparent",
    "process_span",
]
