"""Spreading many sources: a stable phase per source, a ramped first round, full jitter on
retries (opt-in), skipped ticks counted, and a lag report that is rate-limited."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest

from bridge import watching
from bridge.watching import LAG_LOG_EVERY_S, Lag, Schedule, WatchConfig, start_offset_s


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_phases_are_stable_per_name_and_spread_over_the_interval() -> None:
    names = [f"source-{i}" for i in range(10_000)]
    interval = 30.0
    offsets = [start_offset_s(n, interval, len(names)) for n in names]
    assert offsets == [start_offset_s(n, interval, len(names)) for n in names]  # stable
    assert all(0 <= o < interval for o in offsets)
    buckets = Counter(int(o // (interval / 10)) for o in offsets)
    assert sorted(buckets) == list(range(10))
    assert all(800 <= count <= 1200 for count in buckets.values()), buckets  # ~1000 each


def test_the_first_round_ramps_with_the_number_of_sources() -> None:
    """Few sources start (nearly) at once; many spread their first polls over at most the
    interval, at START_RATE_PER_S first polls per second."""
    assert start_offset_s("a", 30.0, 1) <= 1 / watching.START_RATE_PER_S
    ramp_s = 100 / watching.START_RATE_PER_S
    offsets = [start_offset_s(f"s{i}", 30.0, 100) for i in range(100)]
    assert max(offsets) < ramp_s
    assert max(offsets) > ramp_s / 2  # really spread, not all at 0
    assert max(start_offset_s(f"s{i}", 5.0, 100_000) for i in range(1000)) < 5.0


def test_full_jitter_draws_each_retry_between_zero_and_its_ceiling() -> None:
    config = WatchConfig(1, 16, jitter=0, retry_jitter=1.0)
    schedule = Schedule(config, now=0.0, rng=random.Random(5))
    expected = random.Random(5)
    delays = [schedule.next_delay(0.0, ok=False) for _ in range(8)]
    ceilings = [2.0, 4.0, 8.0, 16.0, 16.0, 16.0, 16.0, 16.0]
    assert delays == [pytest.approx(c * (1 - expected.random())) for c in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert schedule.next_delay(100.0, ok=True) == 1.0  # a success starts over, unjittered
    assert WatchConfig(1).retry_jitter == 0.0  # the library default: exact doubling
    assert WatchConfig(1).with_retry_jitter(0.5).with_jitter(0.1).retry_jitter == 0.5
    with pytest.raises(ValueError, match="retry_jitter"):
        WatchConfig(1, retry_jitter=2)


def test_sources_that_fail_together_retry_apart() -> None:
    config = WatchConfig(1, 60, retry_jitter=1.0)
    rng = random.Random(1)
    retries = {round(Schedule(config, 0.0, rng).next_delay(0.0, ok=False), 6) for _ in range(50)}
    assert len(retries) == 50


def test_ticks_overrun_are_skipped_and_counted() -> None:
    schedule = Schedule(WatchConfig(10, jitter=0), now=0.0)
    assert schedule.next_delay(35.0, ok=True) == 5.0  # ticks at 10, 20 and 30 overrun
    assert schedule.missed == 3
    assert schedule.next_delay(40.0, ok=True) == 10.0
    assert schedule.missed == 3


def test_an_offset_moves_the_whole_grid() -> None:
    schedule = Schedule(WatchConfig(10, jitter=0), now=0.0, offset_s=4.0)
    assert schedule.next_delay(4.5, ok=True) == 9.5  # tick 1 at 14
    assert schedule.next_delay(14.0, ok=True) == 10.0


def test_lag_is_measured_and_reported_at_most_every_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    seen: list[float] = []
    missed: list[int] = []
    lag = Lag(seen.append, missed.append, clock=clock)
    with caplog.at_level(logging.WARNING, logger="bridge.watch"):
        lag.observe("a", 0.2)  # on time enough: no report
        lag.observe("a", 3.0)
        lag.observe("b", 7.0)
        lag.skipped(2)
        lag.skipped(0)
        clock.now += LAG_LOG_EVERY_S - 1
        lag.observe("c", 9.0)  # within the period: counted, not logged
        clock.now += 1
        lag.observe("d", 2.0)
    assert seen == [0.2, 3.0, 7.0, 9.0, 2.0]
    assert missed == [2]
    reports = [r.getMessage() for r in caplog.records if "behind schedule" in r.getMessage()]
    assert len(reports) == 2
    assert "1 poll(s)" in reports[0]
    assert "3 poll(s)" in reports[1]
    assert "worst 9.0s late, source 'c'" in reports[1]
    assert "2 tick(s) skipped" in reports[1]
