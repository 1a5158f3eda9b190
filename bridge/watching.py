"""The watch engine: poll a source on a fixed-rate schedule and yield its events.

``watch_external(source, interval)`` returns an async iterator. Polling happens inside that
iterator, so leaving the ``async for`` (or calling ``aclose()``) stops it: no task is left
behind. Ticks are fixed-rate: tick *n* is due at ``start + n * interval`` plus a small random
jitter that never accumulates, so a slow poll does not push every later tick back (ticks that
were missed entirely are skipped, not bunched). A failed poll is logged with the source's name
and retried after ``interval * 2**failures``, capped at ``max_backoff``; a success re-anchors the
schedule at the base interval.

Spreading many sources (what the service does, see :mod:`bridge.service.delivery`):

* :func:`start_offset_s`: a stable phase per source, from a hash of its name, so sources with
  the same interval do not all tick together; the first round ramps over
  ``min(interval, sources / START_RATE_PER_S)`` instead of firing every source at once.
* ``WatchConfig(retry_jitter=1.0)``: "full jitter", each backoff delay drawn between 0 and its
  ceiling, so sources that failed together do not retry in lockstep (0, the default, keeps the
  exact doubling of the contract above).
* :class:`Lag`: how late polls start (the ``koprs_bridge_schedule_lag_seconds`` histogram and
  a warning at most every ``LAG_LOG_EVERY_S``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from bridge.aio import SHARED_RNG, Backoff
from bridge.errors import BridgeError
from bridge.events import ExternalEvent
from bridge.units import Seconds, to_seconds

__all__ = [
    "Clock",
    "ExternalSource",
    "Lag",
    "LoopClock",
    "Schedule",
    "WatchConfig",
    "start_offset_s",
    "watch_external",
    "watch_external_with_config",
]

log = logging.getLogger("bridge.watch")

_MAX_DOUBLINGS = 64
"""Consecutive failures past this no longer double the wait (it is at the ceiling anyway)."""
START_RATE_PER_S = 200.0
"""First polls per second at most when many sources start together (the ramp)."""
LAG_LOG_EVERY_S = 30.0
LAG_WARN_S = 1.0
"""A poll that starts later than this after it was due counts as behind schedule."""


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
    retry_jitter: float
    """Fraction of each backoff delay drawn at random: 0 (the default) waits exactly the
    doubled delay, 1 anywhere between 0 and it ("full jitter")."""

    def __init__(
        self,
        interval: Seconds,
        max_backoff: Seconds | None = None,
        *,
        jitter: float = 0.05,
        retry_jitter: float = 0.0,
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
        if not 0 <= retry_jitter <= 1:
            raise ValueError(
                f"retry_jitter must be a fraction between 0 and 1, got {retry_jitter!r}"
            )
        object.__setattr__(self, "interval", interval_s)
        object.__setattr__(self, "max_backoff", backoff_s)
        object.__setattr__(self, "jitter", float(jitter))
        object.__setattr__(self, "retry_jitter", float(retry_jitter))

    def with_max_backoff(self, max_backoff: Seconds) -> WatchConfig:
        """A copy of this config with another backoff ceiling."""
        return WatchConfig(
            self.interval, max_backoff, jitter=self.jitter, retry_jitter=self.retry_jitter
        )

    def with_jitter(self, jitter: float) -> WatchConfig:
        """A copy of this config with another jitter fraction."""
        return WatchConfig(
            self.interval, self.max_backoff, jitter=jitter, retry_jitter=self.retry_jitter
        )

    def with_retry_jitter(self, retry_jitter: float) -> WatchConfig:
        """A copy of this config with another backoff jitter fraction (1: full jitter)."""
        return WatchConfig(
            self.interval, self.max_backoff, jitter=self.jitter, retry_jitter=retry_jitter
        )


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
    """When the next poll is due: fixed-rate ticks with jitter, exponential backoff on failure.

    ``offset_s`` delays the first tick (and so the whole grid): :func:`start_offset_s`."""

    def __init__(
        self,
        config: WatchConfig,
        now: float,
        rng: random.Random | None = None,
        *,
        offset_s: float = 0.0,
    ) -> None:
        self.config = config
        self.offset_s = offset_s
        """Seconds from ``now`` to the first tick."""
        self.missed = 0
        """Ticks skipped so far because a poll (or the wait for a slot) overran them."""
        self._anchor = now + offset_s
        self._tick = 0
        self._rng = rng or SHARED_RNG
        # The ceilings double up to max_backoff (the documented contract); ``retry_jitter``
        # (the service's: full) draws each delay below its ceiling, so sources that failed
        # together do not retry together. The library default is exact doubling.
        self.backoff = Backoff(
            2 * config.interval, config.max_backoff, jitter=config.retry_jitter, rng=self._rng
        )

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
        tick = max(self._tick + 1, int((now - self._anchor) // interval) + 1)
        self.missed += tick - self._tick - 1
        self._tick = tick
        due = self._anchor + tick * interval
        return max(0.0, due - now) + self._rng.uniform(0.0, self.config.jitter * interval)


def start_offset_s(name: str, interval_s: float, sources: int = 1) -> float:
    """When source ``name`` should first poll, in seconds after its start, so that ``sources``
    sources starting together spread over their interval: a stable phase from a hash of the
    name, scaled to the ramp ``min(interval, sources / START_RATE_PER_S)``."""
    phase = zlib.crc32(name.encode("utf-8", "surrogateescape")) / 2**32
    return phase * min(interval_s, sources / START_RATE_PER_S)


class Lag:
    """How late polls start after they were due: a metric and a rate-limited warning.

    One per service (its sources share it). ``on_lag`` gets each poll's lag in seconds
    (``koprs_bridge_schedule_lag_seconds``), ``on_missed`` the ticks a source skipped."""

    def __init__(
        self,
        on_lag: Callable[[float], None] | None = None,
        on_missed: Callable[[int], None] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.on_lag = on_lag
        self.on_missed = on_missed
        self.clock = clock or LoopClock()
        self.missed = 0
        """Ticks skipped by every source so far."""
        self.late = 0
        """Polls that started more than ``LAG_WARN_S`` late, since the last warning."""
        self._worst_s = 0.0
        self._worst_source = ""
        self._logged_at: float | None = None

    def observe(self, source: str, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        if self.on_lag is not None:
            self.on_lag(lag_s)
        if lag_s < LAG_WARN_S:
            return
        self.late += 1
        if lag_s > self._worst_s:
            self._worst_s, self._worst_source = lag_s, source
        now = self.clock.monotonic()
        if self._logged_at is None or now - self._logged_at >= LAG_LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "behind schedule: %d poll(s) started more than %.1fs late since the last "
                "report (worst %.1fs late, source %r), %d tick(s) skipped so far; polls in "
                "flight are limited by max_concurrent_polls",
                self.late,
                LAG_WARN_S,
                self._worst_s,
                self._worst_source,
                self.missed,
            )
            self.late, self._worst_s = 0, 0.0

    def skipped(self, ticks: int) -> None:
        if ticks > 0:
            self.missed += ticks
            if self.on_missed is not None:
                self.on_missed(ticks)


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
    failing_since = 0.0
    while True:
        try:
            events = await source.poll()
        except Exception as exc:  # any poll failure is retried, never fatal
            now = clock.monotonic()
            failing_since = failing_since if schedule.failures else now
            delay = schedule.next_delay(now, ok=False)
            log_poll_failure(source.name, exc, schedule.failures, delay)
        else:
            now = clock.monotonic()
            if schedule.failures:
                log_recovery(source.name, schedule.failures, now - failing_since)
            for event in events:
                yield event
            delay = schedule.next_delay(now, ok=True)
        await clock.sleep(delay)


def log_recovery(name: str, failures: int, failing_s: float) -> None:
    """One line when a source works again after failures: how many, for how long."""
    log.info(
        "source %r recovered: polled and delivered again after %d failed attempt(s) over %.1fs",
        name,
        failures,
        failing_s,
    )


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
