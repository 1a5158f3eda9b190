"""Reads of several streams on a Redis Cluster, where one ``XREAD`` may not span two slots.

Each source's stream ``koprs:external:<name>`` is in its own slot, so on a Cluster the watch
reads every stream with a command of its own. A blocking read is left running between calls
of :meth:`ClusterReads.read` (it is not cancelled when another stream's read returns first):
cancelling an ``XREADGROUP`` that the server already answered would leave its entries
pending with nobody handling them until the next claim. Only :meth:`cancel` (a new start, a
lost stream, closing) stops the reads in flight; their positions are then out of date.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

__all__ = ["ClusterReads"]


class ClusterReads:
    """One read in flight per stream; :meth:`read` returns what the first ones brought."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._error: BaseException | None = None

    async def read(
        self,
        streams: Sequence[str],
        command: Callable[[str], Awaitable[Any]],
        timeout_s: float,
    ) -> list[tuple[str, Any]]:
        """Start ``command(stream)`` for every stream without a read in flight, wait until
        at least one finished (at most ``timeout_s``), and return ``(stream, reply)`` of each
        finished one. An error of a finished read is raised: at once when no other read
        brought anything, else at the next call (the replies that came are not dropped)."""
        if self._error is not None:
            earlier, self._error = self._error, None
            raise earlier
        for stream in streams:
            if stream not in self._tasks:
                self._tasks[stream] = asyncio.ensure_future(command(stream))
        await asyncio.wait(
            self._tasks.values(), timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED
        )
        replies: list[tuple[str, Any]] = []
        error: BaseException | None = None
        for stream, task in list(self._tasks.items()):
            if not task.done():
                continue
            del self._tasks[stream]
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                error = error or exc
                continue
            replies.append((stream, task.result()))
        if error is not None:
            if not replies:
                raise error
            self._error = error
        return replies

    async def gather(
        self, streams: Sequence[str], command: Callable[[str], Awaitable[Any]]
    ) -> list[tuple[str, Any]]:
        """``command(stream)`` for every stream at once (non-blocking reads), in order."""
        results = await asyncio.gather(*(command(stream) for stream in streams))
        return list(zip(streams, results, strict=True))

    async def cancel(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        self._error = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
