"""``ObjectStorePoller``: list a store (under a prefix) and diff the listing by ETag.

The committed state is a :class:`~bridge.sources.packed.PackedState`: the paths in key order
and their ETags packed (about 110 bytes per object with 36-character keys). S3 lists keys in
that order, so a poll *merges* the listing, page by page, with the state: a page whose paths
are those of the next state entries (the usual poll) is compared in a few C-level operations
(its ETags packed as the state's are, one comparison of bytes; where they differ, the slots
that differ are found by halving); other pages path by path. A store may list
:class:`~bridge.sources.stores.base.PackedPage` pages (``LocalStore`` does): paths and ETag
bytes, no objects, which the diff builds only for the entries that have an event. Paths the
listing skips are ``Removed``, listed paths the state does not have ``Added``, paths whose ETag
changed ``Modified``. Events come out in listing order, removals last (sorted by path).

A store that lists out of key order (a custom store, an S3-compatible server that does not
sort) is diffed as correctly, more slowly: from the first page out of order on, by a dict of the
state entries not listed yet (built for that poll, dropped after it).
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, islice
from operator import lt
from typing import Self

from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.sources.base import (
    Changeset,
    Replay,
    StateDelta,
    StateMapSource,
    chain_event,
    replay_chain,
)
from bridge.sources.packed import DIGEST_SIZE, EMPTY_SLOT, EMPTY_SLOT_HEX, PackedState, empty_slots
from bridge.sources.stores import ObjectStore, StoredObject
from bridge.sources.stores.base import PackedPage

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
        if page:
            self._feed(_Page(page))

    def _feed(self, page: _Page) -> None:
        if self._unlisted is not None:
            self._feed_by_dict(page)
            return
        paths = page.paths
        keys, start = self._state.key_list, self._next
        stop = bisect_right(keys, paths[-1], start)
        if stop - start == len(paths) and paths == keys[start:stop]:
            self._compare_in_place(page)  # the same paths: compare the ETags' slots
            self._next, self._last = stop, paths[-1]
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

    def _compare_in_place(self, page: _Page) -> None:
        """Diff a page whose paths are those of the state entries from ``_next`` on: one
        comparison of bytes when nothing changed (the usual poll), else the differing slots
        (found by halving), and the empty ones (ETags that do not pack), compared as text."""
        state, base = self._state, self._next
        stop = base + len(page.paths)
        window = bytes(state.digests[base * DIGEST_SIZE : stop * DIGEST_SIZE])
        if page.objects is not None:  # a list: its ETags as text, against the slots in hex
            if window.find(EMPTY_SLOT) < 0 and ",".join(
                [obj.etag for obj in page.objects]
            ) == window.hex(",", DIGEST_SIZE):
                return
            self._merge(page, stop)
            return
        listed = page.digests
        if window == listed and window.find(EMPTY_SLOT) < 0:
            return
        suspects = set(_differing_slots(window, listed))
        if window.find(EMPTY_SLOT) >= 0 or listed.find(EMPTY_SLOT) >= 0:
            suspects.update(empty_slots(window), empty_slots(listed))
        keys, events, delta = state.key_list, self._events, self.delta
        for k in sorted(suspects):
            etag = page.etag(k)
            if etag != state.etag_at(base + k):
                events.append(Modified(page.object(k)))
                delta[keys[base + k]] = etag

    def _merge(self, page: _Page, stop: int) -> None:
        """Diff a page in key order whose paths sort after the last one, against the state
        entries ``_next:stop`` (those up to its last path)."""
        state, events, delta = self._state, self._events, self.delta
        keys, base = state.key_list, self._next
        slots = state.digests[base * DIGEST_SIZE : stop * DIGEST_SIZE]
        objects, listed = page.objects, page.digests
        hexes = slots.hex() if objects is not None else ""  # a list: compared as text
        window = bytes(slots) if objects is None else b""
        i = base
        for k, path in enumerate(page.paths):
            if i < stop and keys[i] < path:  # state entries not listed
                j = bisect_left(keys, path, i, stop)
                self._gaps.append((i, j))
                i = j
            if i < stop and keys[i] == path:
                # Equal slots (or hex) are equal ETags, but for the empty slot (an ETag that
                # does not pack): compare that one as text, with the state's.
                if objects is not None:
                    etag = objects[k].etag
                    at = (i - base) * _HEX_SIZE
                    same = len(etag) == _HEX_SIZE and hexes.startswith(etag, at)
                    differs = not same or etag == EMPTY_SLOT_HEX
                else:
                    at, slot = (
                        (i - base) * DIGEST_SIZE,
                        listed[k * DIGEST_SIZE : (k + 1) * DIGEST_SIZE],
                    )
                    differs = slot != window[at : at + DIGEST_SIZE] or slot == EMPTY_SLOT
                    etag = page.etag(k) if differs else ""
                if differs and etag != state.etag_at(i):
                    events.append(Modified(page.object(k)))
                    delta[path] = etag
                i += 1
            else:
                obj = page.object(k)
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

    def _feed_by_dict(self, page: _Page) -> None:
        state, events, delta = self._state, self._events, self.delta
        assert self._unlisted is not None
        pop = self._unlisted.pop
        for k, path in enumerate(page.paths):
            i = pop(path, -1)
            if i < 0:
                i = state.index(path)  # not in the state, or listed already (twice, then)
            if i < 0:
                obj = page.object(k)
                events.append(Added(obj))
                delta[path] = obj.etag
            elif (etag := page.etag(k)) != state.etag_at(i):
                events.append(Modified(page.object(k)))
                delta[path] = etag

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
    """A :class:`ListingDiff` that emits, for each object of a recorded intent, the intent's
    events again and then the change since (see :class:`~bridge.sources.base.Replay` and
    :func:`~bridge.sources.base.replay_chain`)."""

    __slots__ = ("_listed", "_replay")

    def __init__(self, state: PackedState, replay: Replay) -> None:
        super().__init__(state)
        self._replay = replay
        self._listed: dict[str, StoredObject] = {}
        """The listed objects of the intent."""

    def _feed(self, page: _Page) -> None:
        super()._feed(page)
        intent, listed = self._replay.delta, self._listed
        for k, path in enumerate(page.paths):
            if path in intent:
                listed[path] = page.object(k)

    def finish(self) -> Changeset:
        self._removals()
        replay = self._replay
        intent, listed = replay.delta, self._listed
        # The diff against the restored state (with the intent) is replaced, for the intent's
        # objects, by their chain from the committed state.
        events = [e for e in self._events if getattr(e.resource, "key", None) not in intent]
        for path, value in sorted(intent.items()):
            obj = listed.get(path)
            before = replay.before.get(path)
            if before is None:
                before = replay.removed.get(path)
            current = None if obj is None else obj.etag
            chain = replay_chain(before, value, replay.lead.get(path, ()), current)
            for kind, etag in chain:
                resource = obj if obj is not None and obj.etag == etag else StoredObject(path, etag)
                events.append(chain_event(kind, resource))
            self.delta[path] = current
        self._events = events
        return self._changeset()


class _Page:
    """A page as the diff reads it: its paths, and its ETags either as the objects of a list
    (``objects``) or, for a :class:`PackedPage`, as 16-byte slots (``digests``) with objects
    built only for the entries with an event (``object``)."""

    __slots__ = ("digests", "etag", "object", "objects", "paths")

    def __init__(self, page: Sequence[StoredObject]) -> None:
        self.paths: list[str]
        self.digests = b""
        self.objects: Sequence[StoredObject] | None = None
        self.etag: Callable[[int], str]
        self.object: Callable[[int], StoredObject]
        if isinstance(page, PackedPage):
            self.paths, self.digests = page.paths, page.digests
            self.etag, self.object = page.etag, page.object
        else:
            self.paths = [obj.path for obj in page]
            self.objects = page
            self.etag, self.object = (lambda k: page[k].etag), page.__getitem__


def _differing_slots(a: bytes, b: bytes) -> list[int]:
    """The indices of the 16-byte slots where ``a`` and ``b`` (as long) differ, by halving:
    about 2 k log(n / k) comparisons of bytes for k differing slots of n."""
    found: list[int] = []
    pending = [(0, len(a) // DIGEST_SIZE)]
    while pending:
        lo, hi = pending.pop()
        if a[lo * DIGEST_SIZE : hi * DIGEST_SIZE] == b[lo * DIGEST_SIZE : hi * DIGEST_SIZE]:
            continue
        if hi - lo == 1:
            found.append(lo)
            continue
        mid = (lo + hi) // 2
        pending += ((mid, hi), (lo, mid))
    return found


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
