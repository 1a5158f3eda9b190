"""OpenTelemetry traces: one span per poll and per published batch, and the consumer's side.

* ``poll <source>`` (INTERNAL): the poll of one source. Its context is the trace context of
  every event the poll found: it travels as the CloudEvents ``traceparent`` extension
  (``ce-traceparent`` in binary mode), so consumers continue the trace of the poll that
  produced an event. The event ``id`` does not depend on it.
* ``publish <destination>`` (PRODUCER), a child of that poll span (taken from the batch's
  ``traceparent``, so a batch republished after a failure or by a new leader still joins its
  poll's trace), with the messaging attributes: ``messaging.system`` (``nats``/``redis``),
  ``messaging.destination.name``, ``messaging.operation.type`` ``send`` with
  ``messaging.operation.name`` ``publish`` (and the older ``messaging.operation`` ``publish``),
  ``messaging.batch.message_count``.
* ``process <source>`` (CONSUMER) on the consumer side (:func:`process_span`, used by
  :func:`bridge.consumer.run_handler`): a child of the event's ``traceparent``.

A failure is recorded on its span (``record_exception`` and status ERROR). Spans are per poll
and per batch, never per event on the publishing side. With ``tracing.exporter: none`` (the
default) there is no tracer at all: no SDK, no span objects, no ``traceparent``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bridge.errors import MissingExtraError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from bridge.consumer.decoding import Envelope
    from bridge.service.config import TracingConfig

__all__ = [
    "INSTRUMENTATION_NAME",
    "Tracing",
    "format_traceparent",
    "otlp_traces_endpoint",
    "parent_context",
    "process_span",
    "record_error",
]

INSTRUMENTATION_NAME = "koprs-bridge"
_PROPAGATOR = TraceContextTextMapPropagator()


def format_traceparent(span_context: SpanContext) -> str | None:
    """The W3C ``traceparent`` of a span context (None for an invalid one)."""
    if not span_context.is_valid:
        return None
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{int(span_context.trace_flags):02x}"
    )


def parent_context(traceparent: str | None) -> otel_context.Context | None:
    """A context whose current span is the remote one ``traceparent`` names (None if absent or
    malformed)."""
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def record_error(span: Span, error: BaseException) -> None:
    """Record ``error`` on ``span`` and mark it failed."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def otlp_traces_endpoint(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare ``http://collector:4318`` gets ``/v1/traces``."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/v1/traces"))
    return endpoint


class Tracing:
    """The bridge's tracer, or none at all (``tracer is None``) when tracing is off."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        *,
        owned: bool = False,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.provider = provider
        self.tracer: Tracer | None = (
            None if provider is None else provider.get_tracer(INSTRUMENTATION_NAME)
        )
        self._owned = owned
        self._exporter = exporter

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing:
        """No tracer for ``exporter: none``; else an SDK provider of the bridge's own (the
        global one is left alone) exporting in batches to the console or over OTLP/HTTP."""
        if config.exporter == "none":
            return cls()
        provider, exporter = build_provider(config)
        return cls(provider, owned=True, exporter=exporter)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Flush (for up to ``timeout_s``) and stop the provider if this object created it;
        an unreachable collector does not hold the shutdown up longer (its retries are cut
        short). Blocking: call it in a thread."""
        if not self._owned or self.provider is None:
            return
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is None:
            return
        # The provider's shutdown exports what is left, retrying as long as the exporter's
        # own timeout allows: stopping the exporter after ``timeout_s`` cuts that short.
        timer = None
        if self._exporter is not None:
            timer = threading.Timer(timeout_s, self._exporter.shutdown)
            timer.daemon = True
            timer.start()
        try:
            shutdown()
        finally:
            if timer is not None:
                timer.cancel()


def build_provider(config: TracingConfig) -> tuple[SdkTracerProvider, SpanExporter]:
    """An SDK provider exporting in batches, and its exporter."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ModuleNotFoundError as exc:  # the `otel` extra (tests/service/test_base_install.py)
        feature = f"tracing.exporter {config.exporter!r}"
        raise MissingExtraError(feature, "otel", exc.name or "opentelemetry.sdk") from exc
    exporter: SpanExporter
    if config.exporter == "console":
        exporter = ConsoleSpanExporter(service_name=config.service_name)
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ModuleNotFoundError as exc:  # the `otel` extra
            module = exc.name or "opentelemetry.exporter.otlp.proto.http"
            raise MissingExtraError("tracing.exporter 'otlp'", "otel", module) from exc
        endpoint = otlp_traces_endpoint(config.endpoint) if config.endpoint else None
        exporter = OTLPSpanExporter(endpoint=endpoint)

    class StoppableExporter(SpanExporter):
        """The exporter, with a ``shutdown`` that may be called twice (by a timer, then by
        the span processor)."""

        def __init__(self, inner: SpanExporter) -> None:
            self.inner = inner
            self._stopped = threading.Event()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return self.inner.export(spans)

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.inner.force_flush(timeout_millis)

        def shutdown(self) -> None:
            if not self._stopped.is_set():
                self._stopped.set()
                self.inner.shutdown()

    exporter = StoppableExporter(exporter)
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


@contextlib.contextmanager
def process_span(
    envelope: Envelope,
    *,
    tracer: Tracer | None = None,
    system: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A CONSUMER span ``process <source>`` around handling one event, continuing the trace
    of the poll that produced it (a child of its ``traceparent``); current inside the block.
    An exception leaving the block is recorded on the span. ``tracer`` defaults to the global
    provider's (a no-op until the application installs an SDK)."""
    tracer = tracer or trace.get_tracer(INSTRUMENTATION_NAME)
    attrs: dict[str, Any] = {
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": envelope.id,
        "cloudevents.event_id": envelope.id,
        "cloudevents.event_type": envelope.type,
        "cloudevents.event_source": envelope.source,
        "cloudevents.event_subject": envelope.subject,
    }
    if system is not None:
        attrs["messaging.system"] = system
    if envelope.source_name is not None:
        attrs["koprs.source.name"] = envelope.source_name
    if attributes:
        attrs.update(attributes)
    with tracer.start_as_current_span(
        f"process {envelope.source_name or envelope.source}",
        context=parent_context(envelope.traceparent),
        kind=SpanKind.CONSUMER,
        attributes=attrs,
    ) as span:
        yield span
