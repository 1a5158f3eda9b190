"""The watch engine: poll a source on a fixed-rate schedule and yield its events.

``watch_external(source, interval)`` returns an async iterator. Polling happens inside that
iterator, so leaving the ``async for`` (or calling ``aclose()``) stops it: no task is left
behind. Ticks are fixed-rate: tick *n* is due at ``start + n * interval`` plus a small random
jitter that never accumulates, so a slow poll does not push every later tick back (ticks that
were missed entirely are skipped, not bunched). A failed poll is logged with the source's name
and retried after ``interval * 2**failures``, capped at ``max_backoff``; a success re-anchors the
schedule at the base interval.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from bridge.aio import Backoff
from bridge.errors import BridgeError
from bridge.events import ExternalEvent
from bridge.units import Seconds, to_seconds

__all__ = [
    "Clock",
    "ExternalSource",
    "LoopClock",
    "Schedule",
    "WatchConfig",
    "watch_external",
    "watch_external_with_config",
]

log = logging.getLogger("bridge.watch")


@runtime_checkable
class ExternalSource(Protocol):
    """Anything that can be polled for changes. It keeps its own state between polls."""

    @property
    def name(self) -> str: ...

    async def poll(self) -> Sequence[ExternalEvent[Any]]: ...


@dataclass(frozen=True, slots=True, init=False)
class WatchConfig:
    """How often to poll and how far to back off. Durations are seconds or ``timedelta``."""

    interval: float
    """Seconds between the starts of two polls."""
    max_backoff: float
    """Ceiling of the wait after consecutive failures; defaults to ``interval * 32``."""
    jitter: float
    """Largest random delay added to each tick, as a fraction of ``interval`` (0 disables)."""

    def __init__(
        self, interval: Seconds, max_backoff: Seconds | None = None, *, jitter: float = 0.05
    ) -> None:
        interval_s = to_seconds(interval, name="interval")
        if interval_s <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        backoff_s = (
            interval_s * 32 if max_backoff is None else to_seconds(max_backoff, name="max_backoff")
        )
        if backoff_s < interval_s:
            raise ValueError(
                f"max_backoff ({backoff_s:g} s) must be >= interval ({interval_s:g} s)"
            )
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be a fraction between 0 and 1, got {jitter!r}")
        object.__setattr__(self, "interval", interval_s)
        object.__setattr__(self, "max_backoff", backoff_s)
        object.__setattr__(self, "jitter", float(jitter))

    def with_max_backoff(self, max_backoff: Seconds) -> WatchConfig:
        """A copy of this config with another backoff ceiling."""
        return WatchConfig(self.interval, max_backoff, jitter=self.jitter)

    def with_jitter(self, jitter: float) -> WatchConfig:
        """A copy of this config with another jitter fraction."""
        return WatchConfig(self.interval, self.max_backoff, jitter=jitter)


class Clock(Protocol):
    """Time as the engine sees it; tests pass a fake one to run schedules without waiting."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The running event loop's clock."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Schedule:
    """When the next poll is due: fixed-rate ticks with jitter, exponential backoff on failure."""

    def __init__(self, config: WatchConfig, now: float, rng: random.Random | None = None) -> None:
        self.config = config
        self._anchor = now
        self._tick = 0
        self._rng = rng or random.Random()
        # Not jittered: "doubling up to max_backoff" is the documented contract (the ticks
        # are jittered, and a failure is followed by ticks again once a poll succeeds).
        self.backoff = Backoff(2 * config.interval, config.max_backoff, jitter=False)

    @property
    def failures(self) -> int:
        """Failed polls in a row."""
        return self.backoff.failures

    def next_delay(self, now: float, *, ok: bool) -> float:
        """Seconds to wait after a poll that ended at ``now`` and succeeded (``ok``) or not."""
        interval = self.config.interval
        if not ok:
            return self.backoff.next()  # interval * 2**failures, capped at max_backoff
        if self.failures:
            self.backoff.reset()
            self._anchor, self._tick = now, 0
        # The first tick strictly after `now` on the grid anchored at the schedule's start:
        # a poll slower than the interval skips the ticks it overran instead of bunching them.
        self._tick = max(self._tick + 1, int((now - self._anchor) // interval) + 1)
        due = self._anchor + self._tick * interval
        return max(0.0, due - now) + self._rng.uniform(0.0, self.config.jitter * interval)


def watch_external(
    source: ExternalSource, interval: Seconds
) -> AsyncGenerator[ExternalEvent[Any], None]:
    """Poll ``source`` every ``interval`` and yield its events (backoff ceiling ``interval*32``)."""
    return watch_external_with_config(source, WatchConfig(interval))


async def watch_external_with_config(
    source: ExternalSource,
    config: WatchConfig,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> AsyncGenerator[ExternalEvent[Any], None]:
    """Poll ``source`` on ``config``'s schedule and yield every event, in the source's order.

    The first poll happens at once. Errors never end the iteration; they are logged (with the
    source's name) and retried with backoff. Leave the ``async for`` to stop polling.
    """
    clock = clock or LoopClock()
    schedule = Schedule(config, clock.monotonic(), rng)
    while True:
        try:
            events = await source.poll()
        except Exception as exc:  # any poll failure is retried, never fatal
            delay = schedule.next_delay(clock.monotonic(), ok=False)
            log_poll_failure(source.name, exc, schedule.failures, delay)
        else:
            for event in events:
                yield event
            delay = schedule.next_delay(clock.monotonic(), ok=True)
        await clock.sleep(delay)


def log_poll_failure(name: str, exc: BaseException, failures: int, delay_s: float) -> None:
    """Log a failed poll: a warning for expected source errors, with a traceback for bugs."""
    expected = isinstance(exc, BridgeError)
    log.warning(
        "poll of source %r failed (%d in a row), retrying in %.2fs: %s",
        name,
        failures,
        delay_s,
        exc if expected else f"{type(exc).__name__}: {exc}",
        exc_info=None if expected else exc,
    )
