"""What a :class:`~bridge.service.delivery.SourceLoop` calls around each poll and publish.

``with telemetry.poll(encoder) as poll: ...`` and ``with telemetry.publish(events): ...``
record the span (when a tracer is set) and the metrics (when a registry is set) of one poll
or one batch. With neither, both return one shared object that does nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from bridge.telemetry.tracing import format_traceparent, parent_context, record_error

if TYPE_CHECKING:
    from bridge.cloudevents import CloudEvent, EventEncoder
    from bridge.telemetry.metrics import SourceMetrics

__all__ = ["PublishTarget", "SourceTelemetry"]


@dataclass(frozen=True, slots=True)
class PublishTarget:
    """Where a source's events go, as span attributes say it."""

    system: str
    """``messaging.system``: ``nats``, ``redis`` (or another sink's name)."""
    destination: str
    """``messaging.destination.name``: ``koprs.external.<source>.*`` (NATS: the subjects of
    the source's items), ``koprs:external:<source>`` (Redis: the stream)."""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    """More attributes (``messaging.destination.template``, the NATS stream...)."""


class SourceTelemetry:
    """The spans and metrics of one source; see the module docstring."""

    __slots__ = ("_publish_attributes", "metrics", "name", "target", "tracer")

    def __init__(
        self,
        name: str,
        *,
        tracer: Tracer | None = None,
        metrics: SourceMetrics | None = None,
        target: PublishTarget | None = None,
    ) -> None:
        self.name = name
        self.tracer = tracer
        self.metrics = metrics
        self.target = target
        attributes: dict[str, Any] = {
            "koprs.source.name": name,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.operation": "publish",  # the name before semantic conventions 1.26
        }
        if target is not None:
            attributes["messaging.system"] = target.system
            attributes["messaging.destination.name"] = target.destination
            attributes.update(target.attributes)
        self._publish_attributes = attributes

    def poll(self, encoder: EventEncoder) -> _PollScope | _NullScope:
        """Around one poll; stamps the poll's ``traceparent`` on what ``encoder`` encodes next."""
        if self.tracer is None and self.metrics is None:
            return _NULL
        return _PollScope(self, encoder)

    def publish(self, events: Sequence[CloudEvent]) -> _PublishScope | _NullScope:
        """Around the publish of one batch."""
        if self.tracer is None and self.metrics is None:
            return _NULL
        return _PublishScope(self, events)

    def rejected(self, reason: str) -> None:
        """One item was left out of a batch (``reason``: see ``REJECTION_REASONS``)."""
        if self.metrics is not None:
            counter = self.metrics.rejected.get(reason)
            if counter is not None:
                counter.inc()

    def set_lease_held(self, held: bool) -> None:
        if self.metrics is not None:
            self.metrics.set_lease_held(held)


class _NullScope:
    __slots__ = ()

    def __enter__(self) -> _NullScope:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def found(self, changes: int) -> None:
        pass


_NULL = _NullScope()


class _Scope:
    """What the poll and publish scopes share: a span made current while they run."""

    __slots__ = ("_owner", "_span", "_start", "_token")

    def __init__(self, owner: SourceTelemetry) -> None:
        self._owner = owner
        self._span: Span | None = None
        self._token: Token[otel_context.Context] | None = None
        self._start = 0.0

    def _enter_span(self, span: Span) -> None:
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._count(exc, time.perf_counter() - self._start)
        span = self._span
        if span is not None:
            if isinstance(exc, Exception):
                record_error(span, exc)
            if self._token is not None:
                otel_context.detach(self._token)
            span.end()

    def _count(self, exc: BaseException | None, elapsed: float) -> None:
        """Update the metrics of the scope that ended (``exc``: how) after ``elapsed`` s."""


class _PollScope(_Scope):
    __slots__ = ("_encoder",)

    def __init__(self, owner: SourceTelemetry, encoder: EventEncoder) -> None:
        super().__init__(owner)
        self._encoder = encoder

    def __enter__(self) -> _PollScope:
        owner = self._owner
        if owner.tracer is not None:
            span = owner.tracer.start_span(
                f"poll {owner.name}",
                kind=SpanKind.INTERNAL,
                attributes={"koprs.source.name": owner.name},
            )
            self._enter_span(span)
            self._encoder.traceparent = format_traceparent(span.get_span_context())
        self._start = time.perf_counter()
        return self

    def found(self, changes: int) -> None:
        """The poll found ``changes`` events."""
        if self._span is not None:
            self._span.set_attribute("koprs.poll.changes", changes)

    def _count(self, exc: BaseException | None, elapsed: float) -> None:
        failed = isinstance(exc, Exception)
        metrics = self._owner.metrics
        if metrics is not None and (exc is None or failed):  # a cancelled poll is no poll
            metrics.polls.inc()
            metrics.poll_duration.observe(elapsed)
            if failed:
                metrics.poll_errors.inc()
                metrics.consecutive_failures.inc()
            else:
                metrics.consecutive_failures.set(0)
                metrics.last_success.set(time.time())


class _PublishScope(_Scope):
    __slots__ = ("_events",)

    def __init__(self, owner: SourceTelemetry, events: Sequence[CloudEvent]) -> None:
        super().__init__(owner)
        self._events = events

    def __enter__(self) -> _PublishScope:
        owner = self._owner
        if owner.tracer is not None:
            events = self._events
            target = owner.target
            self._enter_span(
                owner.tracer.start_span(
                    f"publish {target.destination if target else owner.name}",
                    # a child of the poll that found these events, whenever it is published
                    context=parent_context(events[0].traceparent) if events else None,
                    kind=SpanKind.PRODUCER,
                    attributes={
                        **owner._publish_attributes,
                        "messaging.batch.message_count": len(events),
                    },
                )
            )
        self._start = time.perf_counter()
        return self

    def _count(self, exc: BaseException | None, elapsed: float) -> None:
        metrics = self._owner.metrics
        if metrics is not None:
            if exc is None:
                metrics.publish_duration.observe(elapsed)
                counters = metrics.events
                for event_type, count in Counter(e.type for e in self._events).items():
                    counter = counters.get(_kind(event_type))
                    if counter is not None:
                        counter.inc(count)
            elif isinstance(exc, Exception):
                metrics.publish_errors.inc()


def _kind(event_type: str) -> str:
    """``dev.koprs.external.added.v1`` -> ``added``."""
    parts = event_type.rsplit(".", 2)
    return parts[-2] if len(parts) == 3 else event_type
