"""What every watch backend yields: decoded deliveries and the end-of-initial-list marker.

A watch is an async iterator of :data:`WatchItem`. With list-then-watch it first yields one
:class:`Delivery` per live item (the latest event of every item that is not removed, as an
``Added``), then :class:`Synced`, then live changes, with no gap and no duplicate between the
two phases. Each :class:`Delivery` must be acknowledged (``ack``) once handled; an
unacknowledged one is delivered again (at least once).

A delivery also says how often the broker delivered it (``attempt``), up to how many times it
may be (``max_attempts``: then :meth:`Delivery.dead_letter` is due instead of a nak), where it
sits in its stream (``position``, to order the events of one item) and how many events of its
consumer were still waiting behind it (``pending``, for lag metrics).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from bridge.consumer.decoding import Envelope

__all__ = ["Delivery", "Position", "Synced", "Watch", "WatchItem"]


@dataclass(frozen=True, slots=True)
class Synced:
    """The initial list is complete: every item live at the start has been delivered."""

    sources: tuple[str, ...] = ()
    listed: bool = True
    """True when a full list of the sources preceded it (a cache may drop every item the list
    lacked); False when the watch resumed a durable position without listing (only changes
    follow: a cache filled before keeps its items)."""


Position = tuple[int, int]
"""An event's place in its stream: NATS ``(stream sequence, 0)``, Redis the entry id as
``(ms, seq)``; comparable among the events of one source."""


async def _noop(*_: object) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received event and the means to settle it with the broker."""

    envelope: Envelope
    initial: bool = False
    """True for items of the initial list (before :class:`Synced`)."""
    attempt: int = 1
    """How many times the broker delivered this event, this delivery included."""
    max_attempts: int | None = None
    """The most deliveries before the event is dead-lettered (None: no bound)."""
    position: Position = (0, 0)
    pending: int | None = None
    """Events of this consumer still waiting after this one when it was read (None: unknown)."""
    _ack: Callable[[], Awaitable[None]] = field(default=_noop, repr=False)
    _nak: Callable[[float], Awaitable[None]] = field(default=_noop, repr=False)
    _dead_letter: Callable[[str], Awaitable[bool]] | None = field(default=None, repr=False)

    @property
    def last_attempt(self) -> bool:
        """Whether this is the last delivery allowed: a failure now dead-letters the event."""
        return self.max_attempts is not None and self.attempt >= self.max_attempts

    async def ack(self) -> None:
        """Handled: do not deliver it again (to this durable consumer / group)."""
        await self._ack()

    async def nak(self, delay_s: float = 0.0) -> None:
        """Not handled: deliver it again after ``delay_s``."""
        await self._nak(delay_s)

    async def dead_letter(self, error: str) -> bool:
        """Give up on the event: write it with ``error`` to the watch's dead-letter destination,
        then acknowledge it. False when that is impossible (no destination, or the write failed:
        then the delivery is left unsettled, so nothing is lost)."""
        if self._dead_letter is None:
            return False
        return await self._dead_letter(error)


WatchItem = Delivery | Synced


class Watch(Protocol):
    """A watch over one or more sources (see the module docstring)."""

    def __aiter__(self) -> AsyncIterator[WatchItem]: ...

    async def aclose(self) -> None: ...
