"""Sources whose state can be checkpointed: poll -> changeset -> deliver -> commit.

The library's pollers keep their state as a flat map of strings: a ``dict[str, str]`` of HTTP
validators; an object listing's path -> ETag, in a :class:`~bridge.sources.packed.PackedState`.
A poll does not change that state: it returns a :class:`Changeset` holding the events and the
state *delta* they lead to, and the state only advances when :meth:`Changeset.commit` is
called. ``watch_external`` commits at once; the bridge service commits only after the broker
acknowledged every event, and persists the same delta (not the whole state) as its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from bridge.events import ExternalEvent
from bridge.watching import ExternalSource

__all__ = [
    "Changeset",
    "DeltaTarget",
    "RecoverableSource",
    "Replay",
    "StateDelta",
    "StateMapSource",
    "StatefulSource",
]

StateDelta = dict[str, str | None]
"""State entries a changeset sets (a string) or deletes (``None``)."""


class DeltaTarget(Protocol):
    """A state that applies a changeset's delta itself, in one batch (``PackedState``)."""

    def apply(self, delta: StateDelta) -> None: ...


@dataclass(slots=True, eq=False)
class Changeset:
    """The events of one poll and the state delta to apply once they are delivered."""

    events: list[ExternalEvent[Any]]
    delta: StateDelta
    _state: dict[str, str] | DeltaTarget = field(repr=False)
    _on_commit: Callable[[], None] | None = field(default=None, repr=False)

    def split(self, max_events: int) -> list[Changeset]:
        """Parts of at most ``max_events`` events, each with the delta entries of its events'
        keys (the rest of the delta goes with the last part). Committing every part, in order,
        is the same as committing this changeset."""
        if len(self.events) <= max_events:
            return [self]
        delta = dict(self.delta)
        parts: list[Changeset] = []
        for start in range(0, len(self.events), max_events):
            events = self.events[start : start + max_events]
            part: StateDelta = {}
            for event in events:
                key = getattr(event.resource, "key", None)
                if key is not None and key in delta:
                    part[key] = delta.pop(key)
            parts.append(Changeset(events, part, self._state))
        parts[-1].delta.update(delta)
        parts[-1]._on_commit = self._on_commit
        return parts

    def leave_out(
        self,
        events: Sequence[ExternalEvent[Any]],
        replay: Replay | None = None,
        also: Sequence[StateDelta] = (),
    ) -> bool:
        """Drop ``events`` (that cannot be published) and keep their items' committed state,
        so the next poll finds their changes again; whether it will.

        An event's state entry is the delta entry of its resource's ``key``: it is left out of
        the delta or, in a replay (the state was restored *with* the intent's delta), set back
        to its value before the intent. A source whose entries are not keyed by item (an HTTP
        poller's validators) keeps its whole state only when every event is dropped; otherwise
        (and for a changeset without state) the dropped items are not found again. The deltas
        in ``also`` (an intent's) get the same changes.
        """
        dropped = {id(event) for event in events}
        self.events = [event for event in self.events if id(event) not in dropped]
        delta = self.delta
        keys: list[str] = []
        for event in events:
            key = getattr(event.resource, "key", None)
            if isinstance(key, str) and key in delta:
                keys.append(key)
        separable = len(keys) == len(events)
        if not separable and not self.events and delta:
            keys, self._on_commit, separable = list(delta), None, True
        targets = [delta, *(other for other in also if other is not delta)]
        for key in keys:
            for target in targets:
                if replay is not None and key in replay.delta:
                    target[key] = replay.before.get(key)
                else:
                    target.pop(key, None)
        return separable

    def commit(self) -> None:
        """Advance the source's state past these events. Call once, after delivery."""
        state = self._state
        if isinstance(state, dict):
            for key, value in self.delta.items():
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
        else:
            state.apply(self.delta)
        if self._on_commit is not None:
            self._on_commit()
        self.delta = {}


@dataclass(frozen=True, slots=True)
class Replay:
    """A batch that may have been published without being committed (a recorded intent).

    The source's state was restored to ``before`` plus ``delta``. The next poll must diff
    against that state *and* emit again, relative to ``before``, the event of every changed
    entry whose current value still equals the one in ``delta`` (same key, kind and version:
    the same event id, so the broker drops a copy that had landed). Its changeset's delta is
    relative to ``before``, so committing it settles the batch. ``removed``: the version of each
    item the delta removes that ``before`` does not hold (see ``bridge.state.Intent.removed``),
    whose ``Removed`` is emitted again as long as the item is not listed.
    """

    before: Mapping[str, str]
    delta: StateDelta
    removed: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class StatefulSource(ExternalSource, Protocol):
    """A source whose poll can be delivered before its state advances, and checkpointed."""

    async def changes(self, replay: Replay | None = None) -> Changeset:
        """Poll and diff against the committed state, without changing it (see Replay)."""
        ...

    def state(self) -> Mapping[str, str]:
        """The committed state, as a checkpoint would store it."""
        ...

    def restore(self, state: Mapping[str, str]) -> None:
        """Replace the committed state with a checkpoint (a later poll diffs against it)."""
        ...


@runtime_checkable
class RecoverableSource(StatefulSource, Protocol):
    """A source whose state can be rebuilt from its published events
    (:mod:`bridge.state.recovery`): the key and version token of every live item."""

    def state_from_published(self, items: Mapping[str, str]) -> Mapping[str, str]:
        """The committed state that ``items`` (live item key -> version token of its last
        event) implies, for :meth:`restore`."""
        ...


class StateMapSource:
    """Base of the built-in pollers: ``poll()`` is ``changes()`` committed at once."""

    _state: dict[str, str]

    @property
    def name(self) -> str:
        raise NotImplementedError

    async def changes(self, replay: Replay | None = None) -> Changeset:
        raise NotImplementedError

    async def poll(self) -> Sequence[ExternalEvent[Any]]:
        changeset = await self.changes()
        changeset.commit()
        return changeset.events

    def state(self) -> Mapping[str, str]:
        return self._state

    def restore(self, state: Mapping[str, str]) -> None:
        self._state = dict(state)
