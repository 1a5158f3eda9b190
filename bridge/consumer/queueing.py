"""What the watch backends share: a queue of what their steps produced, handed out one item at a
time by the iteration, and closing.

A backend implements :meth:`QueuedWatch._fill`: run steps (reads, list fetches, reconnections...)
until the queue holds something or the watch is closed. A step queues :class:`Delivery` and
:class:`Synced` items, or a :class:`~bridge.errors.DecodeError` (``on_decode_error="raise"``),
which the iteration raises when its turn comes; the next iteration goes on after it.
"""

from __future__ import annotations

from collections import deque
from typing import Self

from bridge.consumer.base import WatchItem
from bridge.errors import DecodeError

__all__ = ["QueuedWatch"]


class QueuedWatch:
    """The iteration and closing of a watch; subclasses fill the queue (see the module
    docstring). Use as an async context manager, or call :meth:`aclose` when done."""

    def __init__(self) -> None:
        self._ready: deque[WatchItem | DecodeError] = deque()
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def __anext__(self) -> WatchItem:
        await self._fill()
        if not self._ready:  # closed
            raise StopAsyncIteration
        item = self._ready.popleft()
        if isinstance(item, DecodeError):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop: an iteration waiting in another task ends; what the watch holds is released."""
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        await self._release()

    async def _fill(self) -> None:
        """Run steps until something is queued or the watch is closed."""
        raise NotImplementedError

    async def _release(self) -> None:
        """Release what the watch holds, once, when it is closed."""

    def _raise_later(self, exc: DecodeError, where: str) -> None:
        """Queue ``exc``, with ``where`` in front of its message, for the iteration to raise."""
        error = type(exc)(f"{where}: {exc}")
        error.__cause__ = exc
        self._ready.append(error)
