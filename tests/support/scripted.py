"""A watch that yields what a test scripts (:class:`ScriptedWatch`) and envelopes made by hand
(:func:`envelope`): the consumer side without a broker."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, Self

from bridge.consumer import Envelope, decode_structured
from bridge.consumer.base import Delivery, Synced, WatchItem
from bridge.events import Added, ExternalEvent
from tests.support.events import object_events

# -- a scripted watch (also used by the handler tests) ----------------------------------------


def envelope(
    key: str,
    kind: type[ExternalEvent[Any]] = Added,
    *,
    etag: str = "e1",
    revision: int = 1,
    source: str = "files",
) -> Envelope:
    """A decoded event of ``key``, as a watch would deliver it."""
    event = object_events([key], kind=kind, revision=revision, etag=etag, source_name=source)[0]
    return decode_structured(event.to_structured(), source_name=source)


class ScriptedWatch:
    """A :class:`Watch` over a script of items (an exception in it is raised when reached).

    ``ack``/``nak`` are recorded in :attr:`settled`; a naked delivery is put back at the end of
    the script, as a broker delivers it again. When the script is through the iteration ends,
    or waits (``then_wait``) until :meth:`aclose`.
    """

    def __init__(
        self, items: Sequence[WatchItem | BaseException], *, then_wait: bool = False
    ) -> None:
        self.script: deque[WatchItem | BaseException] = deque(items)
        self.settled: list[tuple[str, str, float]] = []
        self.then_wait = then_wait
        self.closed = asyncio.Event()

    def delivery(self, env: Envelope, *, initial: bool = False) -> Delivery:
        async def ack() -> None:
            self.settled.append(("ack", env.id, 0.0))

        async def nak(delay_s: float) -> None:
            self.settled.append(("nak", env.id, delay_s))
            self.script.append(self.delivery(env, initial=initial))

        return Delivery(env, initial=initial, _ack=ack, _nak=nak)

    def add(self, env: Envelope, *, initial: bool = False) -> Self:
        self.script.append(self.delivery(env, initial=initial))
        return self

    def synced(self, *sources: str) -> Self:
        self.script.append(Synced(tuple(sources)))
        return self

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchItem:
        await asyncio.sleep(0)
        if not self.script:
            if self.then_wait:
                await self.closed.wait()
            raise StopAsyncIteration
        item = self.script.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed.set()
