"""Event handlers in the style of ``Kubereq.Watcher``: ``init``, ``handle_event``, ``terminate``.

A class::

    class Deployer(EventHandler[dict[str, str]]):
        async def init(self) -> dict[str, str]:
            return {}

        async def handle_event(self, kind, resource, state):
            if kind == "removed":
                state.pop(resource.path, None)
            else:
                await deploy(resource)
                state[resource.path] = resource.etag
            return state

    await run_handler(Deployer(), watch_nats(url, ["files"], durable="deployer"))

or a function::

    @event_handler(initial_state=0)
    async def count(kind: EventKind, resource: Any, seen: int) -> int:
        return seen + 1

:func:`run_handler` calls ``init()`` once, then ``handle_event(kind, resource, state)`` for each
delivery, one at a time, in order, and keeps the state it returns. A delivery is acknowledged
only after its handler returned. When the handler raises, the delivery is **not** acknowledged:
it is naked with a delay that doubles with each failure of the same event (by CloudEvent id),
from ``initial_backoff_s`` up to ``max_backoff_s``, the failure is logged with the event id, and
the state stays as it was; the broker delivers the event again after the delay (to this watch or,
for a shared durable consumer, to another), and the watch goes on meanwhile.

**Poison events**: the watch bounds the deliveries of one event (``max_deliveries``, default 5).
A failure on the last one, or a delivery past the bound (a consumer died while handling it,
again and again), sends the event with the error to the watch's dead-letter destination and
acknowledges it (see the README, "Dead letters"); the handler is not called for the latter. It
is logged and counted (``koprs_bridge_consumer_dead_letters_total``). When the dead letter
cannot be written the event is naked as before: nothing is lost.

**Per-item order**: a handler never applies an older event of an item after a newer one. When an
event failed and a newer event of the same item (same source and key, later in the stream) is
handled before its retry comes, the retry is **dropped**: acknowledged without calling the
handler, logged at debug and counted (``koprs_bridge_consumer_stale_events_total``); the newer
event carries the item's whole state. This holds within one :func:`run_handler`: consumers that
share a durable consumer or group split events between them, so an item's events may then be
handled by different processes.

``terminate(reason, state)`` is called once when :func:`run_handler` ends, with ``"normal"``
(the watch ended), ``"shutdown"`` (the task was cancelled) or the exception that ended it (raised
by the watch, e.g. a :class:`~bridge.errors.DecodeError` with ``on_decode_error="raise"``, which
:func:`run_handler` raises again after ``terminate``). :class:`Synced` is passed to
``handle_synced(synced, state)`` (does nothing by default); an error there is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Literal, TypeVar, cast

from opentelemetry import trace
from opentelemetry.trace import Tracer

from bridge.aio import Backoff
from bridge.consumer.base import Delivery, Position, Synced, Watch
from bridge.events import EventKind
from bridge.telemetry.metrics import ConsumerMetrics
from bridge.telemetry.tracing import INSTRUMENTATION_NAME, process_span

__all__ = [
    "EventHandler",
    "FunctionHandler",
    "TerminateReason",
    "event_handler",
    "run_handler",
]

log = logging.getLogger(__name__)

S = TypeVar("S")
TerminateReason = Literal["normal", "shutdown"] | BaseException
"""Why :func:`run_handler` ended: the watch ended, the task was cancelled, or an error."""
HandleEvent = Callable[[EventKind, Any, S], Awaitable[S]]

_MAX_TRACKED_FAILURES = 10_000


class EventHandler(Generic[S]):
    """Base class of a handler: override :meth:`handle_event`, and the others when needed."""

    async def init(self) -> S:
        """The initial state (called once, before the first event). Default: None."""
        return cast(S, None)

    async def handle_event(self, kind: EventKind, resource: Any, state: S) -> S:
        """Handle one change (``kind`` is ``added``, ``modified`` or ``removed``; ``resource``
        the item, its last known state for ``removed``); return the new state."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle_event")

    async def handle_delivery(self, delivery: Delivery, state: S) -> S:
        """Handle one delivery; by default ``handle_event(kind, resource, state)``. Override to
        see the CloudEvent context (``delivery.envelope``: id, source, time...)."""
        envelope = delivery.envelope
        return await self.handle_event(envelope.kind, envelope.event.resource, state)

    async def handle_synced(self, synced: Synced, state: S) -> S:
        """The initial list is complete. Default: nothing."""
        return state

    async def terminate(self, reason: TerminateReason, state: S) -> None:
        """Called once when :func:`run_handler` ends. Default: nothing."""


class FunctionHandler(EventHandler[S]):
    """A handler made of an ``async (kind, resource, state) -> state`` function."""

    def __init__(
        self,
        handle: HandleEvent[S],
        initial_state: S,
        *,
        terminate: Callable[[TerminateReason, S], Awaitable[None]] | None = None,
    ) -> None:
        self._handle = handle
        self._initial_state = initial_state
        self._terminate = terminate
        self.__name__ = getattr(handle, "__name__", type(self).__name__)

    async def init(self) -> S:
        return self._initial_state

    async def handle_event(self, kind: EventKind, resource: Any, state: S) -> S:
        return await self._handle(kind, resource, state)

    async def terminate(self, reason: TerminateReason, state: S) -> None:
        if self._terminate is not None:
            await self._terminate(reason, state)

    def __repr__(self) -> str:
        return f"<FunctionHandler {self.__name__}>"


def event_handler(
    initial_state: S,
    *,
    terminate: Callable[[TerminateReason, S], Awaitable[None]] | None = None,
) -> Callable[[HandleEvent[S]], FunctionHandler[S]]:
    """Decorator: turn ``async def f(kind, resource, state) -> state`` into a handler."""

    def wrap(handle: HandleEvent[S]) -> FunctionHandler[S]:
        return FunctionHandler(handle, initial_state, terminate=terminate)

    return wrap


async def run_handler(
    handler: EventHandler[S],
    watch: Watch,
    *,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 30.0,
    tracer: Tracer | None = None,
    metrics: ConsumerMetrics | None = None,
    consumer: str | None = None,
) -> S:
    """Feed every item of ``watch`` to ``handler`` (see the module docstring); return the final
    state when the watch ends. The watch is not closed here.

    Each event is handled inside a ``process <source>`` span (OpenTelemetry, ``tracer`` or the
    global provider's, a no-op unless the application installs an SDK): a child of the event's
    ``traceparent``, so the trace of the poll that produced it goes on; a failure is recorded
    on it.

    ``metrics`` (a :class:`~bridge.telemetry.metrics.ConsumerMetrics`) counts handled events,
    failures, redeliveries, dead letters and stale retries and tracks the lag, labelled with
    ``consumer`` (default: the watch's durable or group name, else the handler's name)."""
    if not (0 <= initial_backoff_s <= max_backoff_s):
        raise ValueError(
            f"run_handler: need 0 <= initial_backoff_s ({initial_backoff_s}) <= "
            f"max_backoff_s ({max_backoff_s})"
        )
    name = getattr(handler, "__name__", type(handler).__name__)
    state = await handler.init()
    retries = _Retries(initial_backoff_s, max_backoff_s)
    tracing = _Tracing(tracer, getattr(watch, "messaging_system", None))
    label = consumer or getattr(watch, "durable_name", None) or name
    ctx = _Context(name, retries, tracing, _Ordering(), _Counting(metrics, label))
    reason: TerminateReason = "normal"
    try:
        async for item in watch:
            if isinstance(item, Synced):
                try:
                    state = await handler.handle_synced(item, state)
                except Exception:
                    log.exception("handler %s failed on the end of the initial list", name)
                continue
            state, handled = await _handle(handler, item, state, ctx)
            if handled:  # the state is kept even if cancelled while acknowledging
                await item.ack()
                ctx.counting.handled(item)
    except asyncio.CancelledError:
        reason = "shutdown"
        raise
    except BaseException as exc:
        reason = exc
        raise
    finally:
        try:
            await handler.terminate(reason, state)
        except Exception:
            log.exception("handler %s failed to terminate (%s)", name, _reason(reason))
    return state


class _Retries:
    """Failures per event id, and the delay before each one is delivered again."""

    def __init__(self, initial_backoff_s: float, max_backoff_s: float) -> None:
        # no jitter: the redelivery delays are documented (and the broker spreads them anyway)
        self.backoff = Backoff(initial_backoff_s, max_backoff_s, jitter=False)
        self.failures: dict[str, int] = {}

    def failed(self, event_id: str) -> tuple[int, float]:
        """(attempt number, delay) after one more failure of the event."""
        attempt = self.failures.pop(event_id, 0) + 1
        self.failures[event_id] = attempt
        if len(self.failures) > _MAX_TRACKED_FAILURES:  # events that never came back
            del self.failures[next(iter(self.failures))]
        return attempt, self.backoff.delay(attempt)

    def succeeded(self, event_id: str) -> None:
        self.failures.pop(event_id, None)


class _Tracing:
    __slots__ = ("system", "tracer")

    def __init__(self, tracer: Tracer | None, system: str | None) -> None:
        self.tracer = tracer or trace.get_tracer(INSTRUMENTATION_NAME)  # once, not per event
        self.system = system


Item = tuple[str, str]
"""(source name, key)."""


class _Ordering:
    """Per item with a failed event not settled yet: the failed positions and the newest
    position handled since (see "Per-item order" in the module docstring)."""

    def __init__(self) -> None:
        self.failing: dict[Item, set[Position]] = {}
        self.handled: dict[Item, Position] = {}

    def stale(self, item: Item, position: Position) -> bool:
        """Whether a newer event of the item was handled after this one had failed."""
        newest = self.handled.get(item)
        return newest is not None and position < newest

    def failed(self, item: Item, position: Position) -> None:
        self.failing.setdefault(item, set()).add(position)
        if len(self.failing) > _MAX_TRACKED_FAILURES:  # items whose events never came back
            oldest = next(iter(self.failing))
            del self.failing[oldest]
            self.handled.pop(oldest, None)

    def settled(self, item: Item, position: Position, *, handled: bool = False) -> None:
        """The event at ``position`` was handled (or dropped, or dead-lettered)."""
        positions = self.failing.get(item)
        if positions is None:
            return
        if handled:
            self.handled[item] = max(self.handled.get(item, position), position)
        positions.discard(position)
        if not positions:
            del self.failing[item]
            self.handled.pop(item, None)


class _Counting:
    """The metrics of one run_handler (nothing without ConsumerMetrics)."""

    def __init__(self, metrics: ConsumerMetrics | None, consumer: str) -> None:
        self.metrics = metrics
        self.consumer = consumer

    def _labels(self, delivery: Delivery) -> tuple[str, str]:
        return self.consumer, delivery.envelope.source_name or ""

    def received(self, delivery: Delivery) -> None:
        if self.metrics is not None and delivery.attempt > 1:
            self.metrics.redeliveries.labels(*self._labels(delivery)).inc()

    def handled(self, delivery: Delivery) -> None:
        if self.metrics is None:
            return
        labels = self._labels(delivery)
        self.metrics.handled.labels(*labels).inc()
        if delivery.pending is not None:
            self.metrics.lag_events.labels(*labels).set(delivery.pending)
            age_s = time.time() - delivery.envelope.time.timestamp() if delivery.pending else 0.0
            self.metrics.lag_seconds.labels(*labels).set(max(0.0, age_s))

    def failed(self, delivery: Delivery) -> None:
        if self.metrics is not None:
            self.metrics.failures.labels(*self._labels(delivery)).inc()

    def dead_lettered(self, delivery: Delivery) -> None:
        if self.metrics is not None:
            self.metrics.dead_letters.labels(*self._labels(delivery)).inc()

    def stale(self, delivery: Delivery) -> None:
        if self.metrics is not None:
            self.metrics.stale.labels(*self._labels(delivery)).inc()


class _Context:
    __slots__ = ("counting", "name", "ordering", "retries", "tracing")

    def __init__(
        self,
        name: str,
        retries: _Retries,
        tracing: _Tracing,
        ordering: _Ordering,
        counting: _Counting,
    ) -> None:
        self.name = name
        self.retries = retries
        self.tracing = tracing
        self.ordering = ordering
        self.counting = counting


async def _handle(
    handler: EventHandler[S], delivery: Delivery, state: S, ctx: _Context
) -> tuple[S, bool]:
    """(new state, True) once handled; (state, False) after a failure (naked or dead-lettered),
    or for a stale retry or a dead-lettered poison event (settled here)."""
    envelope = delivery.envelope
    item = (envelope.source_name or "", envelope.key)
    ctx.counting.received(delivery)
    if ctx.ordering.stale(item, delivery.position):
        log.debug(
            "event %s (%s %r of source %s) is older than one handled since it failed: dropped",
            envelope.id, envelope.kind, envelope.key, envelope.source_name,
        )  # fmt: skip
        ctx.ordering.settled(item, delivery.position)
        ctx.retries.succeeded(envelope.id)
        await delivery.ack()
        ctx.counting.stale(delivery)
        return state, False
    if delivery.max_attempts is not None and delivery.attempt > delivery.max_attempts:
        error = (
            f"delivered {delivery.attempt} times without being settled (more than "
            f"max_deliveries {delivery.max_attempts}: a consumer died handling it?)"
        )
        if await _give_up(delivery, error, ctx):
            ctx.ordering.settled(item, delivery.position)
            return state, False
    try:
        with process_span(envelope, tracer=ctx.tracing.tracer, system=ctx.tracing.system):
            new_state = await handler.handle_delivery(delivery, state)
    except Exception as exc:
        ctx.counting.failed(delivery)
        if delivery.last_attempt and await _give_up(
            delivery, f"{type(exc).__name__}: {exc}", ctx, exc=exc
        ):
            ctx.ordering.settled(item, delivery.position)
            ctx.retries.succeeded(envelope.id)
            return state, False
        attempt, delay_s = ctx.retries.failed(envelope.id)
        log.exception(
            "handler %s failed on event %s (%s %r of source %s), attempt %d; not acknowledged, "
            "delivered again in %.2f s",
            ctx.name, envelope.id, envelope.kind, envelope.key, envelope.source_name,
            max(attempt, delivery.attempt), delay_s,
        )  # fmt: skip
        ctx.ordering.failed(item, delivery.position)
        await delivery.nak(delay_s)
        return state, False
    ctx.retries.succeeded(envelope.id)
    ctx.ordering.settled(item, delivery.position, handled=True)
    return new_state, True


async def _give_up(
    delivery: Delivery, error: str, ctx: _Context, *, exc: BaseException | None = None
) -> bool:
    """Dead-letter the delivery; True once written and acknowledged."""
    envelope = delivery.envelope
    if not await delivery.dead_letter(error):
        return False
    log.error(
        "handler %s gave up on event %s (%s %r of source %s) after %d deliveries: "
        "dead-lettered (%s)",
        ctx.name, envelope.id, envelope.kind, envelope.key, envelope.source_name,
        delivery.attempt, error, exc_info=exc,
    )  # fmt: skip
    ctx.counting.dead_lettered(delivery)
    return True


def _reason(reason: TerminateReason) -> str:
    return reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
