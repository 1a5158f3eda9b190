"""``ObjectStorePoller``: list a store (under a prefix) and diff the listing by ETag.

The committed state is a :class:`~bridge.sources.packed.PackedState`: the paths in key order
and their ETags packed (about 110 bytes per object with 36-character keys). S3 lists keys in
that order, so a poll *merges* the listing, page by page, with the state: a page whose paths
and ETags are those of the next state entries (the usual no-change poll) is compared in a few
C-level operations; other pages path by path. Paths the listing skips are ``Removed``, listed
paths the state does not have ``Added``, paths whose ETag changed ``Modified``. Events come out
in listing order, removals last (sorted by path).

A store that lists out of key order (a custom store, an S3-compatible server that does not
sort) is diffed as correctly, more slowly: from the first page out of order on, by a dict of the
state entries not listed yet (built for that poll, dropped after it).
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, islice
from operator import lt
from typing import Self

from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.sources.base import Changeset, Replay, StateDelta, StateMapSource
from bridge.sources.packed import DIGEST_SIZE, EMPTY_SLOT, EMPTY_SLOT_HEX, PackedState
from bridge.sources.stores import ObjectStore, StoredObject

__all__ = ["ListingDiff", "ObjectStorePoller", "diff_listing"]

log = logging.getLogger(__name__)

_HEX_SIZE = 2 * DIGEST_SIZE


class ObjectStorePoller(StateMapSource):
    """Polls an object store. ``ObjectStorePoller(store).with_prefix("configs/")``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.prefix = ""
        self._name: str | None = None
        self._tracked = PackedState()

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
        state = self._tracked
        diff = ListingDiff(state) if replay is None else ReplayDiff(state, replay)
        async for page in self.store.list(self.prefix):
            diff.feed(page)
        return diff.finish()

    def state(self) -> Mapping[str, str]:
        """The committed path -> ETag state (a read-only view, in key order)."""
        return self._tracked

    def restore(self, state: Mapping[str, str]) -> None:
        migrate = getattr(self.store, "migrate_etags", None)  # ETags of an earlier version
        self._tracked = PackedState(migrate(state) if migrate is not None else state)

    def state_from_published(self, items: Mapping[str, str]) -> Mapping[str, str]:
        """The state is path -> ETag, and an object's version token is its ETag."""
        return items

    async def aclose(self) -> None:
        """Close the store if it holds connections."""
        close = getattr(self.store, "aclose", None)
        if close is not None:
            await close()


class ListingDiff:
    """Diffs a listing, fed page by page, against a committed :class:`PackedState`.

    While the listing comes in key order, a merge: ``_next`` is the first state entry not
    reached yet, and every listed path so far sorts before it. State entries the listing went
    past are gone (``_gaps``). A page out of order switches the diff, for the rest of the
    listing, to a dict diff: the state entries not listed yet go into a dict path -> position
    (``_unlisted``), each listed path is popped from it, and what is left at the end is gone.
    """

    __slots__ = (
        "_commit_to",
        "_events",
        "_gaps",
        "_generation",
        "_last",
        "_next",
        "_state",
        "_unlisted",
        "delta",
    )

    def __init__(self, state: PackedState, *, commit_to: dict[str, str] | None = None) -> None:
        self._state = state
        self._commit_to = commit_to
        """Where the changeset commits, if not into ``state`` (see :func:`diff_listing`)."""
        self._generation = state.generation
        self._events: list[ExternalEvent[StoredObject]] = []
        self.delta: StateDelta = {}
        self._next = 0
        self._last: str | None = None
        """The last path listed (merge mode)."""
        self._gaps: list[tuple[int, int]] = []
        """Ranges of state entries the listing went past (merge mode)."""
        self._unlisted: dict[str, int] | None = None
        """The state entries not listed yet, path -> position (dict mode; None: merge mode)."""

    def feed(self, page: Sequence[StoredObject]) -> None:
        if self._state.generation != self._generation:
            raise RuntimeError("the state changed while a listing was diffed against it")
        if not page:
            return
        if self._unlisted is not None:
            self._feed_by_dict(page)
            return
        paths = [obj.path for obj in page]
        keys, start = self._state.key_list, self._next
        stop = bisect_right(keys, paths[-1], start)
        if stop - start == len(paths) and paths == keys[start:stop] and self._same(page, stop):
            self._next, self._last = stop, paths[-1]  # nothing changed in this page
        elif (self._last is None or self._last < paths[0]) and all(
            map(lt, paths, islice(paths, 1, None))
        ):
            self._merge(page, stop)
            self._last = paths[-1]
        else:
            log.debug(
                "listing (%d state entries) out of key order at %r: diffing the rest by dict",
                len(keys),
                paths[0],
            )
            self._switch_to_dict()
            self._feed_by_dict(page)

    def _same(self, page: Sequence[StoredObject], stop: int) -> bool:
        """Whether the ETags of ``page`` are those of the state entries ``_next:stop``."""
        window = self._state.digests[self._next * DIGEST_SIZE : stop * DIGEST_SIZE]
        if window.find(EMPTY_SLOT) >= 0:  # an unpacked ETag (or a false alarm): path by path
            return False
        return ",".join([obj.etag for obj in page]) == window.hex(",", DIGEST_SIZE)

    def _merge(self, page: Sequence[StoredObject], stop: int) -> None:
        """Diff a page in key order whose paths sort after the last one, against the state
        entries ``_next:stop`` (those up to its last path)."""
        state, events, delta = self._state, self._events, self.delta
        keys, base = state.key_list, self._next
        hexes = state.digests[base * DIGEST_SIZE : stop * DIGEST_SIZE].hex()
        i = base
        for obj in page:
            path = obj.path
            if i < stop and keys[i] != path and keys[i] < path:  # state entries not listed
                j = bisect_left(keys, path, i, stop)
                self._gaps.append((i, j))
                i = j
            if i < stop and keys[i] == path:
                etag = obj.etag
                at = (i - base) * _HEX_SIZE
                same = len(etag) == _HEX_SIZE and hexes.startswith(etag, at)
                # An empty slot (all zeros) stands for an unpacked ETag: compare that one.
                if not (same and etag != EMPTY_SLOT_HEX) and etag != state.etag_at(i):
                    events.append(Modified(obj))
                    delta[path] = etag
                i += 1
            else:
                events.append(Added(obj))
                delta[path] = obj.etag
        self._next = stop

    def _switch_to_dict(self) -> None:
        """Switch to the dict diff: the entries not listed yet are the gaps and the rest."""
        keys, done = self._state.key_list, self._next
        unlisted = dict(zip(islice(keys, done, None), range(done, len(keys)), strict=True))
        for start, stop in self._gaps:
            unlisted.update(zip(keys[start:stop], range(start, stop), strict=True))
        self._unlisted, self._gaps = unlisted, []

    def _feed_by_dict(self, page: Sequence[StoredObject]) -> None:
        state, events, delta = self._state, self._events, self.delta
        assert self._unlisted is not None
        pop = self._unlisted.pop
        for obj in page:
            path = obj.path
            i = pop(path, -1)
            if i < 0:
                i = state.index(path)  # not in the state, or listed already (twice, then)
            if i < 0:
                events.append(Added(obj))
                delta[path] = obj.etag
            elif obj.etag != state.etag_at(i):
                events.append(Modified(obj))
                delta[path] = obj.etag

    def finish(self) -> Changeset:
        self._removals()
        return self._changeset()

    def _changeset(self) -> Changeset:
        target = self._state if self._commit_to is None else self._commit_to
        return Changeset(self._events, self.delta, target)

    def _removals(self) -> None:
        """``Removed`` for the state entries not listed, in key order."""
        if self._state.generation != self._generation:
            raise RuntimeError("the state changed while a listing was diffed against it")
        state = self._state
        keys = state.key_list
        if self._unlisted is None:
            gone: Iterable[int] = chain.from_iterable(
                range(start, stop) for start, stop in [*self._gaps, (self._next, len(keys))]
            )
        else:
            gone = sorted(self._unlisted.values())
        for i in gone:
            path = keys[i]
            self._events.append(Removed(StoredObject(path, state.etag_at(i))))
            self.delta[path] = None


class ReplayDiff(ListingDiff):
    """A :class:`ListingDiff` that also emits again the events of a recorded intent whose
    objects have not changed since (see :class:`~bridge.sources.base.Replay`)."""

    __slots__ = ("_listed", "_replay")

    def __init__(self, state: PackedState, replay: Replay) -> None:
        super().__init__(state)
        self._replay = replay
        self._listed: set[str] = set()
        """The listed paths of the intent."""

    def feed(self, page: Sequence[StoredObject]) -> None:
        super().feed(page)
        intent, before = self._replay.delta, self._replay.before
        for obj in page:
            path = obj.path
            if path in intent:
                self._listed.add(path)
                if intent[path] == obj.etag and path not in self.delta:
                    self._events.append(Modified(obj) if path in before else Added(obj))
                    self.delta[path] = obj.etag

    def finish(self) -> Changeset:
        self._removals()
        before, removed = self._replay.before, self._replay.removed
        for path, value in sorted(self._replay.delta.items()):
            if value is not None or path in self._listed:
                continue
            etag = before.get(path)
            if etag is None:
                etag = removed.get(path)
            if etag is not None:
                self._events.append(Removed(StoredObject(path, etag)))
                self.delta[path] = None
        return self._changeset()


def diff_listing(state: Mapping[str, str], listing: Iterable[Sequence[StoredObject]]) -> Changeset:
    """Diff a whole listing (pages) against ``state`` at once; see :class:`ListingDiff`.

    The changeset commits into ``state`` if it is a ``PackedState`` or a ``dict`` (any other
    mapping is copied, and the copy receives the commit)."""
    if isinstance(state, PackedState):
        diff = ListingDiff(state)
    else:
        commit_to = state if isinstance(state, dict) else None
        diff = ListingDiff(PackedState(state), commit_to=commit_to)
    for page in listing:
        diff.feed(page)
    return diff.finish()
