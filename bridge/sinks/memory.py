"""``MemorySink``: an in-memory sink for tests, with the brokers' dedup semantics.

It keeps every accepted event per source, in order, and drops an event whose id it already
accepted for that source, as JetStream (``Nats-Msg-Id``) and the Redis sink (dedup markers) do.
Tests can make publishes fail (:meth:`MemorySink.fail_next`, optionally after part of the batch
landed, like a broker that acknowledged some messages before the connection dropped), hold
publishes (:meth:`MemorySink.block`) and await a number of accepted events
(:meth:`MemorySink.wait_for`) or publish calls (:meth:`MemorySink.wait_for_calls`) instead of
sleeping. With ``max_event_bytes`` it refuses events larger than that (their structured form),
like a broker's message size limit, and says so in :meth:`MemorySink.oversized`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.cloudevents import CloudEvent
from bridge.errors import PublishError
from bridge.subjects import validate_source_name

__all__ = ["MemorySink"]

_REMOVED_TYPE_SUFFIX = ".removed.v1"


@dataclass(slots=True)
class _Failure:
    landed: int
    message: str


class MemorySink:
    """Records published events; see the module docstring."""

    def __init__(self, name: str = "memory", *, max_event_bytes: int | None = None) -> None:
        self.name = name
        self.max_event_bytes = max_event_bytes
        self.published: dict[str, list[CloudEvent]] = {}
        """Accepted events per source name, in order, duplicates dropped."""
        self.publish_calls = 0
        """Calls of :meth:`publish`, failed ones included."""
        self.duplicates = 0
        """Events dropped because their id was accepted before."""
        self.connected = False
        self._ids: dict[str, set[str]] = {}
        self._failures: list[_Failure] = []
        self._changed = asyncio.Condition()
        self._open = asyncio.Event()
        self._open.set()

    @property
    def description(self) -> str:
        return f"memory://{self.name}"

    def __repr__(self) -> str:
        return f"<MemorySink {self.name} {self.count()} events>"

    async def connect(self) -> None:
        self.connected = True

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        validate_source_name(source_name)
        self.publish_calls += 1
        async with self._changed:
            self._changed.notify_all()
        await self._open.wait()
        if self.oversized_now(events):
            raise PublishError(f"{self.description}: an event of {source_name!r} is too large")
        failure = self._failures.pop(0) if self._failures else None
        accepted = events if failure is None else events[: failure.landed]
        if accepted:
            seen = self._ids.setdefault(source_name, set())
            stored = self.published.setdefault(source_name, [])
            for event in accepted:
                if event.id in seen:
                    self.duplicates += 1
                else:
                    seen.add(event.id)
                    stored.append(event)
            async with self._changed:
                self._changed.notify_all()
        if failure is not None:
            raise PublishError(
                f"{self.description}: {len(events) - len(accepted)} of {len(events)} events of "
                f"{source_name!r} not acknowledged ({failure.message})"
            )

    async def oversized(self, source_name: str, events: Sequence[CloudEvent]) -> dict[int, str]:
        return self.oversized_now(events)

    def oversized_now(self, events: Sequence[CloudEvent]) -> dict[int, str]:
        limit = self.max_event_bytes
        if limit is None:
            return {}
        sizes = {i: len(event.to_structured()) for i, event in enumerate(events)}
        return {i: f"{n} bytes, over {limit}" for i, n in sizes.items() if n > limit}

    async def aclose(self) -> None:
        self.connected = False

    async def ping(self) -> bool:
        """Connected (for readiness)."""
        return self.connected

    # -- for tests --

    def fail_next(self, calls: int = 1, *, landed: int = 0, message: str = "injected") -> None:
        """Make the next ``calls`` publishes raise PublishError after their first ``landed``
        events were accepted (0: none of the batch lands)."""
        self._failures += [_Failure(landed, message) for _ in range(calls)]

    def block(self) -> None:
        """Hold every publish (before it stores anything) until :meth:`unblock`."""
        self._open.clear()

    def unblock(self) -> None:
        self._open.set()

    def events(self, source_name: str | None = None) -> list[CloudEvent]:
        """Accepted events of one source, or of all sources (grouped by source)."""
        if source_name is not None:
            return list(self.published.get(source_name, ()))
        return [event for events in self.published.values() for event in events]

    def count(self, source_name: str | None = None) -> int:
        if source_name is not None:
            return len(self.published.get(source_name, ()))
        return sum(len(events) for events in self.published.values())

    def items(self, source_name: str) -> dict[str, CloudEvent]:
        """Current state: the latest event per item key, removed items left out."""
        current: dict[str, CloudEvent] = {}
        for event in self.published.get(source_name, ()):
            if event.type.endswith(_REMOVED_TYPE_SUFFIX):
                current.pop(event.subject, None)
            else:
                current[event.subject] = event
        return current

    async def wait_for_calls(self, calls: int = 1) -> None:
        """Wait until :meth:`publish` was called ``calls`` times (blocked or failed ones too):
        with :meth:`block`, the way to know a publish is in flight."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.publish_calls >= calls)

    async def wait_for(self, count: int, source_name: str | None = None) -> list[CloudEvent]:
        """Wait until at least ``count`` events were accepted (for ``source_name``, or in all),
        and return them. Bound the wait with ``asyncio.timeout`` (or the test timeout)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.count(source_name) >= count)
        return self.events(source_name)
