"""Where committed source state lives between polls and across restarts.

A checkpoint is a source's *revision* (a counter of committed changesets with events, starting
at a random base when a source's state is first created, so ids from a lost state never repeat), its
state map, and possibly an *intent*: a batch of events recorded just before it was published
and not yet committed. Whoever loads a checkpoint with an intent publishes that batch again
(same ids, so the broker drops copies) and commits it before polling, so a change published by
a replica that died before its commit is never contradicted by silence (an item added, then
deleted while no replica led, still gets its ``Removed``).

Commits carry only the delta of one batch, so a one-object change in a large bucket writes one
entry, not the listing. ``MemoryStateStore`` keeps nothing across restarts; ``FileStateStore``
keeps a journal per source in a folder (one replica); ``RedisStateStore`` serves replicas that
elect leaders, with every write fenced by the lease.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from bridge.cloudevents import CloudEvent
from bridge.sources.base import StateDelta

__all__ = [
    "Checkpoint",
    "Intent",
    "MemoryStateStore",
    "StateStore",
    "apply_delta",
    "event_from_record",
    "event_to_record",
]


@dataclass(slots=True)
class Intent:
    """A batch about to be published: its events, its delta, the revision it leads to."""

    revision: int
    """The source's revision once this batch is committed."""
    delta: StateDelta
    events: list[CloudEvent]


@dataclass(slots=True)
class Checkpoint:
    """A source's committed state."""

    revision: int = 0
    state: dict[str, str] = field(default_factory=dict)
    intent: Intent | None = None


@runtime_checkable
class StateStore(Protocol):
    """Loads and writes checkpoints; writes raise StateError (FencedError without the lease)."""

    async def load(self, source_name: str) -> Checkpoint | None: ...

    async def begin(self, source_name: str, intent: Intent) -> None:
        """Record ``intent`` before its events are published (replacing an older one)."""
        ...

    async def commit(self, source_name: str, revision: int, delta: StateDelta) -> None:
        """Apply ``delta``, set ``revision`` and drop the intent, atomically."""
        ...

    async def reset(self, source_name: str) -> None:
        """Forget the checkpoint (it was unreadable); the source resyncs from a full poll."""
        ...

    async def aclose(self) -> None: ...


def apply_delta(state: dict[str, str], delta: Mapping[str, str | None]) -> None:
    for key, value in delta.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


def event_to_record(event: CloudEvent) -> dict[str, Any]:
    return {**event.attributes(), "data": event.data}


def event_from_record(record: Mapping[str, Any]) -> CloudEvent:
    fields = {k: v for k, v in record.items() if k != "specversion"}
    return CloudEvent(**fields)


class MemoryStateStore:
    """Checkpoints in this process only (the source objects already hold their state)."""

    def __init__(self) -> None:
        self.checkpoints: dict[str, Checkpoint] = {}

    async def load(self, source_name: str) -> Checkpoint | None:
        found = self.checkpoints.get(source_name)
        if found is None:
            return None
        return Checkpoint(found.revision, dict(found.state), found.intent)

    async def begin(self, source_name: str, intent: Intent) -> None:
        self.checkpoints.setdefault(source_name, Checkpoint()).intent = intent

    async def commit(self, source_name: str, revision: int, delta: StateDelta) -> None:
        checkpoint = self.checkpoints.setdefault(source_name, Checkpoint())
        checkpoint.revision = revision
        apply_delta(checkpoint.state, delta)
        checkpoint.intent = None

    async def reset(self, source_name: str) -> None:
        self.checkpoints.pop(source_name, None)

    async def aclose(self) -> None:
        return None
