"""The watch engine: ``WatchConfig``, the fixed-rate ``Schedule`` and ``watch_external``.

Time is faked: :class:`FakeClock` advances instantly when the engine sleeps and records every
requested delay, so schedules are asserted exactly and no test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from bridge import (
    Added,
    ExternalEvent,
    ExternalSource,
    Modified,
    Removed,
    SourceError,
    WatchConfig,
    watch_external,
    watch_external_with_config,
)
from bridge.watching import Schedule

# -- helpers --------------------------------------------------------------------------------


class FakeClock:
    """A :class:`Clock` whose ``sleep`` returns at once, moving fake time forward."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # still a suspension point, as a real sleep is

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptExhaustedError(BaseException):
    """Raised by a scripted source polled more often than scripted. A ``BaseException`` so the
    engine, which retries every ``Exception``, lets it end the test instead of spinning."""


Step = Sequence[ExternalEvent[Any]] | Exception


class ScriptedSource:
    """Each poll plays the next step: a list of events, or an exception to raise.

    ``poll_s`` (optional) is how long each poll takes on the fake clock.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        name: str = "scripted",
        clock: FakeClock | None = None,
        poll_s: Sequence[float] = (),
    ) -> None:
        self.name = name
        self.steps = list(steps)
        self.polls = 0
        self.poll_started_at: list[float] = []
        self._clock = clock
        self._poll_s = list(poll_s)

    async def poll(self) -> Sequence[ExternalEvent[Any]]:
        if self.polls >= len(self.steps):
            raise ScriptExhaustedError(f"polled {self.polls + 1} times, scripted {len(self.steps)}")
        step = self.steps[self.polls]
        if self._clock is not None:
            self.poll_started_at.append(self._clock.now)
            if self.polls < len(self._poll_s):
                self._clock.advance(self._poll_s[self.polls])
        self.polls += 1
        if isinstance(step, Exception):
            raise step
        return step


class CountingSource:
    """Every poll returns one ``Added(n)`` where n counts the polls from 1."""

    name = "counting"

    def __init__(self) -> None:
        self.polls = 0

    async def poll(self) -> list[ExternalEvent[int]]:
        self.polls += 1
        return [Added(self.polls)]


def no_jitter(interval: float, max_backoff: float | None = None) -> WatchConfig:
    return WatchConfig(interval, max_backoff, jitter=0)


async def take(events: AsyncIterator[ExternalEvent[Any]], count: int) -> list[ExternalEvent[Any]]:
    """The next ``count`` events of an async iterator (without closing it)."""
    taken: list[ExternalEvent[Any]] = []
    while len(taken) < count:
        taken.append(await anext(events))
    return taken


async def settle() -> None:
    """Let every callback the loop has scheduled so far run (e.g. async generator finalizers)."""
    for _ in range(5):
        await asyncio.sleep(0)


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


# -- WatchConfig ----------------------------------------------------------------------------


def test_config_max_backoff_defaults_to_32_intervals() -> None:
    config = WatchConfig(5)
    assert config.interval == 5.0
    assert config.max_backoff == 160.0
    assert WatchConfig(0.5).max_backoff == 16.0


def test_config_accepts_timedelta() -> None:
    config = WatchConfig(timedelta(seconds=2), timedelta(minutes=1))
    assert (config.interval, config.max_backoff) == (2.0, 60.0)
    assert WatchConfig(timedelta(milliseconds=250)).max_backoff == 8.0


def test_with_max_backoff_returns_a_new_config() -> None:
    config = WatchConfig(10, jitter=0.1)
    changed = config.with_max_backoff(timedelta(seconds=45))
    assert changed is not config
    assert (changed.interval, changed.max_backoff, changed.jitter) == (10.0, 45.0, 0.1)
    assert config.max_backoff == 320.0  # the original is untouched


def test_config_is_frozen() -> None:
    config = WatchConfig(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.interval = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: WatchConfig(0), "interval"),
        (lambda: WatchConfig(-1), "interval"),
        (lambda: WatchConfig(float("nan")), "interval"),
        (lambda: WatchConfig(timedelta(seconds=-3)), "interval"),
        (lambda: WatchConfig("5"), "interval"),  # type: ignore[arg-type]
        (lambda: WatchConfig(True), "interval"),
        (lambda: WatchConfig(10, 5), "max_backoff"),
        (lambda: WatchConfig(10, -1), "max_backoff"),
        (lambda: WatchConfig(10, "60"), "max_backoff"),  # type: ignore[arg-type]
        (lambda: WatchConfig(10).with_max_backoff(timedelta(seconds=1)), "max_backoff"),
        (lambda: WatchConfig(10, jitter=1.5), "jitter"),
        (lambda: WatchConfig(10, jitter=-0.1), "jitter"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


# -- Schedule -------------------------------------------------------------------------------


def test_schedule_is_fixed_rate_a_slow_poll_does_not_shift_later_ticks() -> None:
    schedule = Schedule(no_jitter(10), now=0.0)
    assert schedule.next_delay(3.0, ok=True) == 7.0  # poll took 3 s: tick 1 stays at t=10
    assert schedule.next_delay(10.0 + 9.5, ok=True) == 0.5  # tick 2 stays at t=20
    assert schedule.next_delay(20.0, ok=True) == 10.0


def test_schedule_skips_missed_ticks_instead_of_bunching_them() -> None:
    schedule = Schedule(no_jitter(10), now=0.0)
    # The first poll took 35 s: ticks at 10, 20 and 30 are gone; the next one is at 40.
    assert schedule.next_delay(35.0, ok=True) == 5.0
    # A poll that ends exactly on a tick waits for the following one, not zero.
    assert schedule.next_delay(50.0, ok=True) == 10.0


def test_schedule_jitter_is_bounded_and_does_not_accumulate() -> None:
    interval, jitter = 10.0, 0.1
    schedule = Schedule(WatchConfig(interval, jitter=jitter), now=0.0, rng=random.Random(7))
    expected_rng = random.Random(7)
    now = 0.0
    offsets: list[float] = []
    for tick in range(1, 1001):
        delay = schedule.next_delay(now, ok=True)
        now += delay
        offset = now - tick * interval
        offsets.append(offset)
        # Each tick is late by the jitter drawn for it, never by the sum of earlier jitters.
        assert offset == pytest.approx(expected_rng.uniform(0.0, jitter * interval), abs=1e-6)
        assert -1e-6 <= offset <= jitter * interval + 1e-6
    assert now == pytest.approx(1000 * interval, abs=jitter * interval + 1e-6)
    assert len({round(o, 9) for o in offsets}) > 1  # jitter is really applied


def test_schedule_with_the_same_seed_is_reproducible() -> None:
    def delays(seed: int) -> list[float]:
        schedule = Schedule(WatchConfig(1, jitter=0.5), now=0.0, rng=random.Random(seed))
        now, out = 0.0, []
        for _ in range(20):
            out.append(schedule.next_delay(now, ok=True))
            now += out[-1]
        return out

    assert delays(1) == delays(1)
    assert delays(1) != delays(2)


def test_schedule_backoff_doubles_up_to_the_cap_and_resets_after_success() -> None:
    schedule = Schedule(no_jitter(1, 10), now=0.0)
    failures = [schedule.next_delay(0.0, ok=False) for _ in range(6)]
    assert failures == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert schedule.failures == 6
    # A success resets: the next tick is one interval after it, the grid re-anchored there.
    assert schedule.next_delay(100.25, ok=True) == 1.0
    assert schedule.failures == 0
    assert schedule.next_delay(101.25, ok=True) == 1.0
    assert schedule.next_delay(102.25, ok=False) == 2.0  # doubling starts over


def test_schedule_backoff_is_not_jittered() -> None:
    schedule = Schedule(WatchConfig(1, 100, jitter=1.0), now=0.0, rng=random.Random(3))
    assert [schedule.next_delay(0.0, ok=False) for _ in range(4)] == [2.0, 4.0, 8.0, 16.0]


# -- watch_external_with_config: schedule as the engine runs it ------------------------------


async def test_watch_backs_off_on_failures_and_resets_after_success() -> None:
    clock = FakeClock()
    boom = SourceError("upstream down")
    source = ScriptedSource(
        [boom, boom, boom, [Added("a")], [], [], boom, [Added("b")], boom, [Modified("c")]],
        clock=clock,
    )
    events = watch_external_with_config(source, no_jitter(10, 50), clock=clock)
    try:
        assert await take(events, 1) == [Added("a")]
        assert clock.sleeps == [20.0, 40.0, 50.0]  # doubling, capped at max_backoff
        assert await take(events, 1) == [Added("b")]
        assert clock.sleeps[3:] == [10.0, 10.0, 10.0, 20.0]  # reset, then one failure again
        assert await take(events, 1) == [Modified("c")]
        assert clock.sleeps[7:] == [10.0, 20.0]
        assert source.polls == 10
    finally:
        await events.aclose()


async def test_watch_polls_at_once_then_on_a_fixed_rate_grid() -> None:
    clock = FakeClock(start=1000.0)
    source = ScriptedSource(
        [[], [], [], [Added("done")]],
        clock=clock,
        poll_s=[3.0, 25.0, 0.0, 0.0],  # the second poll overruns two ticks
    )
    events = watch_external_with_config(source, no_jitter(10), clock=clock)
    try:
        assert await take(events, 1) == [Added("done")]
    finally:
        await events.aclose()
    assert source.poll_started_at == [1000.0, 1010.0, 1040.0, 1050.0]
    assert clock.sleeps == [7.0, 5.0, 10.0]


async def test_watch_jitter_uses_the_given_rng() -> None:
    clock = FakeClock(start=0.0)
    source = ScriptedSource([[], [], [Added("x")]], clock=clock)
    rng, expected = random.Random(42), random.Random(42)
    events = watch_external_with_config(source, WatchConfig(10, jitter=0.2), clock=clock, rng=rng)
    try:
        await take(events, 1)
    finally:
        await events.aclose()
    j1, j2 = expected.uniform(0, 2), expected.uniform(0, 2)
    assert clock.sleeps == pytest.approx([10 + j1, 10 - j1 + j2])


# -- watch_external_with_config: events, errors, shutdown --------------------------------------


async def test_events_come_out_in_the_order_the_source_returns_them() -> None:
    clock = FakeClock()
    batch1: list[ExternalEvent[Any]] = [Added("a"), Modified("b"), Removed("c"), Added("d")]
    batch2: list[ExternalEvent[Any]] = [Removed("a"), Added("c")]
    source = ScriptedSource([batch1, [], batch2], clock=clock)
    events = watch_external_with_config(source, no_jitter(1), clock=clock)
    try:
        assert await take(events, 6) == batch1 + batch2
    finally:
        await events.aclose()


async def test_errors_are_logged_with_the_source_name_and_never_end_the_watch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    source = ScriptedSource(
        [SourceError("bucket gone"), RuntimeError("bug in source"), [Added("ok")]],
        name="flaky-source",
        clock=clock,
    )
    events = watch_external_with_config(source, no_jitter(1), clock=clock)
    with caplog.at_level(logging.WARNING, logger="bridge.watch"):
        try:
            assert await take(events, 1) == [Added("ok")]
        finally:
            await events.aclose()
    records = [r for r in caplog.records if r.name == "bridge.watch"]
    assert len(records) == 2
    expected, bug = records
    assert "'flaky-source'" in expected.getMessage()
    assert "bucket gone" in expected.getMessage()
    assert "1 in a row" in expected.getMessage()
    assert "retrying in 2.00s" in expected.getMessage()
    assert expected.exc_info is None  # an expected source error: no traceback
    assert "'flaky-source'" in bug.getMessage()
    assert "RuntimeError: bug in source" in bug.getMessage()
    assert "2 in a row" in bug.getMessage()
    assert bug.exc_info is not None  # an unexpected exception: with traceback
    assert bug.levelno == logging.WARNING


async def test_cancellation_is_not_swallowed_as_a_poll_error() -> None:
    started, polled_again = asyncio.Event(), asyncio.Event()
    cancelled = False

    class Hanging:
        name = "hanging"
        polls = 0

        async def poll(self) -> list[ExternalEvent[Any]]:
            nonlocal cancelled
            self.polls += 1
            if self.polls > 1:
                polled_again.set()
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled = True
                raise
            return []

    async def consume() -> None:
        async for _ in watch_external_with_config(Hanging(), no_jitter(1), clock=FakeClock()):
            pass

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    # Either the watch ends (right) or it treats the cancellation as a failed poll and polls
    # again (wrong): wait for whichever happens first.
    again = asyncio.create_task(polled_again.wait())
    await asyncio.wait({task, again}, return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    assert not polled_again.is_set()
    assert task.cancelled()
    assert cancelled
    await settle()
    assert other_tasks() == set()


async def test_break_stops_polling_and_leaves_no_task() -> None:
    clock = FakeClock()
    source = CountingSource()
    seen: list[ExternalEvent[Any]] = []
    async for event in watch_external_with_config(source, no_jitter(1), clock=clock):
        seen.append(event)
        if len(seen) == 3:
            break
    assert seen == [Added(1), Added(2), Added(3)]
    await settle()
    assert source.polls == 3
    assert len(clock.sleeps) == 2
    assert other_tasks() == set()


async def test_aclose_stops_polling_and_leaves_no_task() -> None:
    clock = FakeClock()
    source = CountingSource()
    events = watch_external_with_config(source, no_jitter(1), clock=clock)
    assert await take(events, 2) == [Added(1), Added(2)]
    await events.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(events)
    await settle()
    assert source.polls == 2
    assert other_tasks() == set()


async def test_watch_external_uses_the_real_clock_and_default_config() -> None:
    source = CountingSource()
    async with contextlib.aclosing(watch_external(source, timedelta(milliseconds=1))) as events:
        assert await take(events, 3) == [Added(1), Added(2), Added(3)]
    assert source.polls == 3


# -- a source written by a user -------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    name: str
    enabled: bool


class FeatureFlags:
    """A custom source, subclassing nothing: it diffs a dict it is handed between polls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.upstream: dict[str, bool] = {}
        self._seen: dict[str, bool] = {}

    async def poll(self) -> list[ExternalEvent[Feature]]:
        events: list[ExternalEvent[Feature]] = []
        for key, value in sorted(self.upstream.items()):
            if key not in self._seen:
                events.append(Added(Feature(key, value)))
            elif self._seen[key] != value:
                events.append(Modified(Feature(key, value)))
        events.extend(
            Removed(Feature(key, value))
            for key, value in sorted(self._seen.items())
            if key not in self.upstream
        )
        self._seen = dict(self.upstream)
        return events


async def test_a_user_written_source_works_with_watch_external() -> None:
    source = FeatureFlags("flags")
    assert isinstance(source, ExternalSource)
    source.upstream = {"dark-mode": False, "beta": True}
    described: list[str] = []
    async with contextlib.aclosing(watch_external(source, timedelta(milliseconds=1))) as events:
        async for event in events:
            match event:
                case Added(Feature(name, enabled)):
                    described.append(f"+{name}={enabled}")
                    if name == "dark-mode":
                        source.upstream = {"dark-mode": True}
                case Modified(Feature(name, enabled)):
                    described.append(f"~{name}={enabled}")
                case Removed(Feature(name, _)):
                    described.append(f"-{name}")
                    break
    assert described == ["+beta=True", "+dark-mode=False", "~dark-mode=True", "-beta"]
