"""``ObjectStorePoller``: list a store (under a prefix) and diff the listing by ETag.

The committed state is one ``dict`` of path -> ETag. A poll walks the listing once, page by
page, looking each path up in that dict: unknown paths are ``Added``, paths whose ETag changed
are ``Modified``. Only when fewer known paths were seen than the state holds does it compute
which ones are gone (``Removed``), so the usual no-change poll of a large bucket costs one dict
lookup per object and keeps one pointer per object (the listed paths, to find removals). Events
come out in listing order, removals last (sorted by path).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Self

from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.sources.base import Changeset, Replay, StateDelta, StateMapSource
from bridge.sources.stores import ObjectStore, StoredObject

__all__ = ["ListingDiff", "ObjectStorePoller", "diff_listing"]


class ObjectStorePoller(StateMapSource):
    """Polls an object store. ``ObjectStorePoller(store).with_prefix("configs/")``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.prefix = ""
        self._name: str | None = None
        self._state: dict[str, str] = {}

    def with_prefix(self, prefix: str) -> Self:
        self.prefix = prefix
        return self

    def with_name(self, name: str) -> Self:
        self._name = name
        return self

    @property
    def name(self) -> str:
        """Defaults to the store's URI joined with the prefix (``s3://bucket/prefix``)."""
        if self._name is not None:
            return self._name
        uri = self.store.uri
        return f"{uri}/{self.prefix}" if self.prefix else uri

    async def changes(self, replay: Replay | None = None) -> Changeset:
        diff = ListingDiff(self._state) if replay is None else ReplayDiff(self._state, replay)
        async for page in self.store.list(self.prefix):
            diff.feed(page)
        return diff.finish()

    async def aclose(self) -> None:
        """Close the store if it holds connections."""
        close = getattr(self.store, "aclose", None)
        if close is not None:
            await close()


class ListingDiff:
    """Diffs a listing, fed page by page, against a committed path -> ETag state."""

    __slots__ = ("_events", "_matched", "_paths", "_state", "delta")

    def __init__(self, state: dict[str, str]) -> None:
        self._state = state
        self._events: list[ExternalEvent[StoredObject]] = []
        self.delta: StateDelta = {}
        self._matched = 0
        self._paths: list[str] = []

    def feed(self, page: Sequence[StoredObject]) -> None:
        get = self._state.get
        matched = 0
        for obj in page:
            known = get(obj.path)
            if known is None:
                self._events.append(Added(obj))
                self.delta[obj.path] = obj.etag
            else:
                matched += 1
                if known != obj.etag:
                    self._events.append(Modified(obj))
                    self.delta[obj.path] = obj.etag
        self._matched += matched
        self._paths.extend([obj.path for obj in page])

    def finish(self) -> Changeset:
        self._removals()
        return Changeset(self._events, self.delta, self._state)

    def _removals(self) -> None:
        state = self._state
        if self._matched < len(state):
            # A copy of the dict (its table only, no new strings) minus the listed paths: less
            # memory and time than a set of the listed paths and a set of the state's paths.
            unseen = state.copy()
            pop = unseen.pop
            for path in self._paths:
                pop(path, None)
            for path in sorted(unseen):
                self._events.append(Removed(StoredObject(path, unseen[path])))
                self.delta[path] = None


class ReplayDiff(ListingDiff):
    """A :class:`ListingDiff` that also emits again the events of a recorded intent whose
    objects have not changed since (see :class:`~bridge.sources.base.Replay`)."""

    __slots__ = ("_replay",)

    def __init__(self, state: dict[str, str], replay: Replay) -> None:
        super().__init__(state)
        self._replay = replay

    def feed(self, page: Sequence[StoredObject]) -> None:
        super().feed(page)
        intent, before = self._replay.delta, self._replay.before
        for obj in page:
            path = obj.path
            if path in intent and intent[path] == obj.etag and path not in self.delta:
                self._events.append(Modified(obj) if path in before else Added(obj))
                self.delta[path] = obj.etag

    def finish(self) -> Changeset:
        self._removals()
        listed = set(self._paths)
        for path, value in sorted(self._replay.delta.items()):
            if value is None and path not in listed and path in self._replay.before:
                self._events.append(Removed(StoredObject(path, self._replay.before[path])))
                self.delta[path] = None
        return Changeset(self._events, self.delta, self._state)


def diff_listing(state: Mapping[str, str], listing: Iterable[Sequence[StoredObject]]) -> Changeset:
    """Diff a whole listing (pages) against ``state`` at once; see :class:`ListingDiff`."""
    diff = ListingDiff(dict(state) if not isinstance(state, dict) else state)
    for page in listing:
        diff.feed(page)
    return diff.finish()
