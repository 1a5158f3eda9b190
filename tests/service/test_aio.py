"""bridge.aio: stopping with a grace period, stop-aware sleep, Backoff, signals."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from bridge import aio
from bridge.aio import Backoff, stop_on_signals, stop_with_grace

# -- Backoff ------------------------------------------------------------------------------------


def test_backoff_without_jitter_doubles_from_first_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.5, 3.0, jitter=False)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.next() == 0.5


def test_backoff_full_jitter_draws_between_zero_and_the_ceiling_from_the_given_rng() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(5))
    expected = random.Random(5)
    delays = [backoff.next() for _ in range(6)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert delays == [c * (1 - expected.random()) for c in ceilings]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # really random, not the ceilings


def test_backoff_cap_wins_over_a_larger_first_delay_and_survives_many_failures() -> None:
    assert Backoff(2.0, 1.0, jitter=False).next() == 1.0
    backoff = Backoff(1e-3, 1.0, jitter=False)
    assert backoff.delay(10_000) == 1.0  # no OverflowError past 1024 doublings
    with pytest.raises(ValueError, match="first_s"):
        Backoff(-1, 1)


# -- sleep --------------------------------------------------------------------------------------


async def test_sleep_ends_when_stop_is_set_and_says_so() -> None:
    stop = asyncio.Event()
    sleeping = asyncio.create_task(aio.sleep(3600, stop))
    await asyncio.sleep(0)
    stop.set()
    assert await sleeping is True
    assert await aio.sleep(3600, stop) is True  # already set: at once


async def test_sleep_without_stop_or_unset_sleeps_the_delay() -> None:
    assert await aio.sleep(0.0, asyncio.Event()) is False
    assert await aio.sleep(0.0) is False


async def test_sleep_passes_a_cancellation_on_and_leaves_no_task() -> None:
    stop = asyncio.Event()
    sleeping = asyncio.create_task(aio.sleep(3600, stop))
    await asyncio.sleep(0)
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeping
    assert asyncio.all_tasks() == {asyncio.current_task()}


# -- stop_with_grace ----------------------------------------------------------------------------


async def test_stop_with_grace_lets_tasks_finish_then_cancels_the_late_ones() -> None:
    finish = asyncio.Event()

    async def finishes() -> str:
        await finish.wait()
        return "done"

    async def hangs() -> None:
        await asyncio.Event().wait()

    quick = asyncio.create_task(finishes(), name="quick")
    late = asyncio.create_task(hangs(), name="late")
    told: list[str] = []
    finish.set()
    await stop_with_grace([quick, late], 0.01, on_late=lambda t: told.append(t.get_name()))
    assert quick.result() == "done"
    assert late.cancelled()
    assert told == ["late"]


async def test_stop_with_grace_cancels_again_a_task_that_swallows_its_cancellation() -> None:
    cancellations = 0

    async def stubborn() -> None:
        nonlocal cancellations
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await stop_with_grace([task], 0.0, recancel_s=0.001)
    assert task.cancelled()
    assert cancellations == 3


async def test_stop_with_grace_does_not_raise_the_tasks_errors() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await stop_with_grace([task], 1.0)
    assert isinstance(task.exception(), RuntimeError)
    await stop_with_grace([], 1.0)  # nothing to stop


# -- signals ------------------------------------------------------------------------------------


async def test_stop_on_signals_sets_the_event_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(asyncio.Event()) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)
    assert signal.getsignal(signal.SIGTERM) == before
