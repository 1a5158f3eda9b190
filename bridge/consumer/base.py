"""What every watch backend yields: decoded deliveries and the end-of-initial-list marker.

A watch is an async iterator of :data:`WatchItem`. With list-then-watch it first yields one
:class:`Delivery` per live item (the latest event of every item that is not removed, as an
``Added``), then :class:`Synced`, then live changes, with no gap and no duplicate between the
two phases. Each :class:`Delivery` must be acknowledged (``ack``) once handled; an
unacknowledged one is delivered again (at least once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from bridge.consumer.decoding import Envelope

__all__ = ["Delivery", "Synced", "Watch", "WatchItem"]


@dataclass(frozen=True, slots=True)
class Synced:
    """The initial list is complete: every item live at the start has been delivered."""

    sources: tuple[str, ...] = ()


async def _noop(*_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received event and the means to settle it with the broker."""

    envelope: Envelope
    initial: bool = False
    """True for items of the initial list (before :class:`Synced`)."""
    _ack: Callable[[], Awaitable[None]] = field(default=_noop, repr=False)
    _nak: Callable[[float], Awaitable[None]] = field(default=_noop, repr=False)

    async def ack(self) -> None:
        """Handled: do not deliver it again (to this durable consumer / group)."""
        await self._ack()

    async def nak(self, delay_s: float = 0.0) -> None:
        """Not handled: deliver it again after ``delay_s``."""
        await self._nak(delay_s)


WatchItem = Delivery | Synced


class Watch(Protocol):
    """A watch over one or more sources (see the module docstring)."""

    def __aiter__(self) -> AsyncIterator[WatchItem]: ...

    async def aclose(self) -> None: ...
