"""Task lifecycles, in one place: stopping with a grace period, sleeping until stopped,
backing off, signals, and a cancellation Python 3.11 can lose.

* :func:`stop_with_grace`: tasks that were told to stop get ``grace_s`` to end by themselves;
  then they are cancelled (again every second while one swallows the cancellation) and
  awaited. Nothing is left running when it returns.
* :func:`sleep`: ``asyncio.sleep`` that ends early when an event is set; says whether it was.
* :class:`Backoff`: exponential backoff from ``first_s`` doubling up to ``cap_s``, with full
  jitter (a random delay between 0 and that) unless the delays are a documented contract
  (the watch schedule, a consumer handler's redelivery delays); the random source can be
  given, so tests are deterministic.
* :func:`stop_on_signals`: SIGINT and SIGTERM set an event while the block runs.
* :func:`keep_cancellation`: await a call that may drop a cancellation (``asyncio.wait_for``
  on Python 3.11, inside redis-py) and raise it anyway.

Tasks whose lifetimes nest use :class:`asyncio.TaskGroup` (a led source's loop and its lease
keeper); long-lived sets of tasks that change while running (the sources of a bridge, added
and removed by a reload) are stopped with :func:`stop_with_grace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any, TypeVar

__all__ = [
    "SHARED_RNG",
    "Backoff",
    "keep_cancellation",
    "sleep",
    "stop_on_signals",
    "stop_with_grace",
]

T = TypeVar("T")

_MAX_DOUBLINGS = 63
"""Failures past this no longer double the delay (it is at the ceiling long before; and
``2.0**1024`` would raise OverflowError)."""


SHARED_RNG = random.Random()
"""The random source of every backoff and schedule not given one: jitter needs no source of
its own, and a ``random.Random`` costs 2.5 KiB (its Mersenne Twister state), 25 MB for
10,000 sources."""


class Backoff:
    """Delays between retries: ``first_s`` after the first failure, doubling after each one
    more, never above ``cap_s`` (which wins over a larger ``first_s``); :meth:`reset` after a
    success starts over.

    With ``jitter`` (True, the default, is 1.0) each delay is ``ceiling * (1 - jitter * r)``
    with ``r`` uniform in [0, 1) from ``rng``: 1.0 is "full jitter" (anywhere up to the
    ceiling), so clients that failed together do not retry together; ``rng`` is the random
    source (a seeded ``random.Random`` in tests). Without (False or 0), the delays are exactly
    the ceilings.
    """

    __slots__ = ("cap_s", "failures", "first_s", "jitter", "rng")

    def __init__(
        self,
        first_s: float,
        cap_s: float,
        *,
        jitter: bool | float = True,
        rng: random.Random | None = None,
    ) -> None:
        if not (first_s >= 0 and cap_s >= 0):
            raise ValueError(f"backoff: need first_s ({first_s}) and cap_s ({cap_s}) >= 0")
        if not 0.0 <= float(jitter) <= 1.0:
            raise ValueError(f"backoff: jitter must be between 0 and 1, not {jitter}")
        self.first_s = first_s
        self.cap_s = cap_s
        self.jitter = float(jitter)
        self.rng = rng or SHARED_RNG
        self.failures = 0
        """Failures in a row so far."""

    def ceiling(self, failures: int) -> float:
        """The longest delay after ``failures`` (>= 1) failures in a row."""
        doublings = min(max(failures, 1) - 1, _MAX_DOUBLINGS)
        return min(self.first_s * 2.0**doublings, self.cap_s)

    def delay(self, failures: int) -> float:
        """The delay after ``failures`` failures in a row (jittered if so configured)."""
        ceiling = self.ceiling(failures)
        return ceiling * (1.0 - self.jitter * self.rng.random()) if self.jitter else ceiling

    def next(self) -> float:
        """Count one more failure; the delay before the next try."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """A success: the next failure waits ``first_s`` (at most) again."""
        self.failures = 0


async def sleep(delay_s: float, stop: asyncio.Event | None = None) -> bool:
    """Sleep ``delay_s`` seconds or until ``stop`` is set; True if ``stop`` is set.

    Unlike ``asyncio.wait_for(stop.wait(), delay_s)`` on Python 3.11, a cancellation that
    arrives as the event is set is never lost."""
    if stop is None:
        await asyncio.sleep(delay_s)
        return False
    if stop.is_set():
        return True
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiter], timeout=max(0.0, delay_s))
    finally:
        if not waiter.done():
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
    return stop.is_set()


async def stop_with_grace(
    tasks: Collection[asyncio.Task[Any]],
    grace_s: float,
    *,
    on_late: Callable[[asyncio.Task[Any]], None] | None = None,
    recancel_s: float = 1.0,
) -> None:
    """Wait up to ``grace_s`` for ``tasks`` (already told to stop) to end; cancel the late
    ones (``on_late`` is told of each first) and wait for every task to end.

    A task that survives its cancellation (a library swallowed the ``CancelledError``) is
    cancelled again every ``recancel_s``. Exceptions of the tasks are not raised here: the
    caller that owns them reads them (or a done callback logged them)."""
    pending = {task for task in tasks if not task.done()}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            if on_late is not None:
                on_late(task)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=recancel_s)
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def stop_on_signals(
    stop: asyncio.Event, signals: Collection[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[asyncio.Event]:
    """Set ``stop`` on SIGINT / SIGTERM while the block runs (in the running loop)."""
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


async def keep_cancellation(awaitable: Awaitable[T]) -> T:
    """Await a redis-py call without losing a cancellation.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py wraps around every write when a
    ``socket_timeout`` is set) returns the result and drops a cancellation that arrives as the
    write completes: the caller would go on as if never cancelled, and a task stopped with one
    ``cancel()`` would run until cancelled again. This raises that cancellation."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await awaitable
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result
