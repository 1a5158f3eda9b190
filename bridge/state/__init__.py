"""Where committed source state lives between polls and across restarts.

A checkpoint is a source's *revision* (a counter of committed changesets with events, starting
at a random base when a source's state is first created, so ids from a lost state never repeat), its
state map, and possibly an *intent*: the revision and state delta of a batch recorded just
before its events were published, and not yet committed. The intent holds no events: their ids
are a function of source, key, kind, version and revision, all of which it fixes. Whoever loads
a checkpoint with an intent restores the state *with* the intent's delta and polls once in
replay mode (:class:`~bridge.sources.base.Replay`): an entry still at the intent's version gets
the intent's event again (same id, so the broker drops a copy that had landed), an entry that
moved on is diffed against the intent's version, so a change published by a replica that died
before its commit is never contradicted by silence (an item added, then deleted while no
replica led, still gets its ``Removed``). A replayed event is re-encoded from the current poll:
its ``time`` (and, for an HTTP ``Removed``, the last body) may differ from the lost copy's.

Commits carry only the delta of one batch, so a one-object change in a large bucket writes one
entry, not the listing. ``MemoryStateStore`` keeps nothing across restarts; ``FileStateStore``
keeps a journal per source in a folder (one replica); ``RedisStateStore`` serves replicas that
elect leaders, with every write fenced by the lease. A source whose store has no checkpoint is
rebuilt from what the broker holds (:mod:`bridge.state.recovery`): the checkpoint is primary,
the broker the fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from bridge.sources.base import StateDelta

__all__ = [
    "Checkpoint",
    "Intent",
    "MemoryStateStore",
    "StateStore",
    "apply_delta",
    "intent_from_record",
    "intent_to_record",
]


@dataclass(slots=True)
class Intent:
    """A batch about to be published: its state delta and the revision it leads to."""

    revision: int
    """The revision the batch's event ids derive from: the source's revision once its whole
    changeset is committed."""
    delta: StateDelta
    removed: dict[str, str] = field(default_factory=dict)
    """The version of each item the batch removes that the committed state does not hold: one
    a replay found in an earlier intent (maybe published) and gone since. A later replay needs
    it to emit that ``Removed`` again with the same id."""


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

    async def commit(
        self,
        source_name: str,
        revision: int,
        delta: StateDelta,
        next_intent: Intent | None = None,
    ) -> None:
        """Apply ``delta``, set ``revision`` and drop the intent, atomically; with
        ``next_intent``, record it in the same write (the next batch of a changeset)."""
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


def intent_to_record(intent: Intent) -> dict[str, Any]:
    record: dict[str, Any] = {"rev": intent.revision, "delta": intent.delta}
    if intent.removed:
        record["removed"] = intent.removed
    return record


def intent_from_record(record: Mapping[str, Any]) -> Intent:
    """An intent from its record (older records also carry ``events``: ignored)."""
    delta = record["delta"]
    if not isinstance(delta, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in delta.items()
    ):
        raise ValueError("an intent's delta must map strings to strings or null")
    removed = record.get("removed", {})
    if not isinstance(removed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in removed.items()
    ):
        raise ValueError("an intent's removed versions must map strings to strings")
    return Intent(int(record["rev"]), dict(delta), dict(removed))


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

    async def commit(
        self,
        source_name: str,
        revision: int,
        delta: StateDelta,
        next_intent: Intent | None = None,
    ) -> None:
        checkpoint = self.checkpoints.setdefault(source_name, Checkpoint())
        checkpoint.revision = revision
        apply_delta(checkpoint.state, delta)
        checkpoint.intent = next_intent

    async def reset(self, source_name: str) -> None:
        self.checkpoints.pop(source_name, None)

    async def aclose(self) -> None:
        return None
