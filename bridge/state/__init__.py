"""Where committed source state lives between polls and across restarts.

A checkpoint is a source's *revision* (how many changesets with events were committed) and
its state map. Commits carry only the delta of one changeset, so a one-object change in a
large bucket writes one entry, not the listing. ``MemoryStateStore`` keeps nothing across
restarts; ``FileStateStore`` keeps a journal per source in a folder (one replica); the Redis
store with fencing serves replicas that elect leaders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bridge.sources.base import StateDelta

__all__ = ["Checkpoint", "MemoryStateStore", "StateStore", "apply_delta"]


@dataclass(slots=True)
class Checkpoint:
    """A source's committed state."""

    revision: int = 0
    state: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class StateStore(Protocol):
    """Loads and commits checkpoints. ``commit`` raises StateError (or FencedError)."""

    async def load(self, source_name: str) -> Checkpoint | None: ...

    async def commit(self, source_name: str, revision: int, delta: StateDelta) -> None: ...

    async def aclose(self) -> None: ...


def apply_delta(state: dict[str, str], delta: Mapping[str, str | None]) -> None:
    for key, value in delta.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


class MemoryStateStore:
    """Checkpoints in this process only (the source objects already hold their state)."""

    def __init__(self) -> None:
        self.checkpoints: dict[str, Checkpoint] = {}

    async def load(self, source_name: str) -> Checkpoint | None:
        found = self.checkpoints.get(source_name)
        return Checkpoint(found.revision, dict(found.state)) if found else None

    async def commit(self, source_name: str, revision: int, delta: StateDelta) -> None:
        checkpoint = self.checkpoints.setdefault(source_name, Checkpoint())
        checkpoint.revision = revision
        apply_delta(checkpoint.state, delta)

    async def aclose(self) -> None:
        return None
