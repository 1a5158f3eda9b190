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
for a shared durable consumer, to another), and the watch goes on meanwhile. An event that
always fails is retried forever, every ``max_backoff_s``. So a later event of the same item can be
handled before the retry of an earlier one: a handler that must not go back to an older state
compares versions (``resource.version``, ``delivery.envelope.time``) or is idempotent.

``terminate(reason, state)`` is called once when :func:`run_handler` ends, with ``"normal"``
(the watch ended), ``"shutdown"`` (the task was cancelled) or the exception that ended it (raised
by the watch, e.g. a :class:`~bridge.errors.DecodeError` with ``on_decode_error="raise"``, which
:func:`run_handler` raises again after ``terminate``). :class:`Synced` is passed to
``handle_synced(synced, state)`` (does nothing by default); an error there is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Literal, TypeVar, cast

from opentelemetry import trace
from opentelemetry.trace import Tracer

from bridge.aio import Backoff
from bridge.consumer.base import Delivery, Synced, Watch
from bridge.events import EventKind
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
) -> S:
    """Feed every item of ``watch`` to ``handler`` (see the module docstring); return the final
    state when the watch ends. The watch is not closed here.

    Each event is handled inside a ``process <source>`` span (OpenTelemetry, ``tracer`` or the
    global provider's, a no-op unless the application installs an SDK): a child of the event's
    ``traceparent``, so the trace of the poll that produced it goes on; a failure is recorded
    on it."""
    if not (0 <= initial_backoff_s <= max_backoff_s):
        raise ValueError(
            f"run_handler: need 0 <= initial_backoff_s ({initial_backoff_s}) <= "
            f"max_backoff_s ({max_backoff_s})"
        )
    name = getattr(handler, "__name__", type(handler).__name__)
    state = await handler.init()
    retries = _Retries(initial_backoff_s, max_backoff_s)
    tracing = _Tracing(tracer, getattr(watch, "messaging_system", None))
    reason: TerminateReason = "normal"
    try:
        async for item in watch:
            if isinstance(item, Synced):
                try:
                    state = await handler.handle_synced(item, state)
                except Exception:
                    log.exception("handler %s failed on the end of the initial list", name)
                continue
            state, handled = await _handle(handler, name, item, state, retries, tracing=tracing)
            if handled:  # the state is kept even if cancelled while acknowledging
                await item.ack()
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


async def _handle(
    handler: EventHandler[S],
    name: str,
    delivery: Delivery,
    state: S,
    retries: _Retries,
    *,
    tracing: _Tracing,
) -> tuple[S, bool]:
    """(new state, True) once handled; (state, False) after a failure, naked."""
    envelope = delivery.envelope
    try:
        with process_span(envelope, tracer=tracing.tracer, system=tracing.system):
            new_state = await handler.handle_delivery(delivery, state)
    except Exception:
        attempt, delay_s = retries.failed(envelope.id)
        log.exception(
            "handler %s failed on event %s (%s %r of source %s), attempt %d; not acknowledged, "
            "delivered again in %.2f s",
            name, envelope.id, envelope.kind, envelope.key, envelope.source_name, attempt,
            delay_s,
        )  # fmt: skip
        await delivery.nak(delay_s)
        return state, False
    retries.succeeded(envelope.id)
    return new_state, True


def _reason(reason: TerminateReason) -> str:
    return reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
