"""``PackedState`` (the object poller's sorted, packed path -> ETag state) and the merge diff.

Every ETag must read back exactly as it was set, whatever its form; the diff must match a plain
dict diff (events in listing order, removals last sorted by path) whether the listing comes in
key order (merged) or not (looked up); deltas must apply as a dict update would.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import LocalStore, MemoryStore, ObjectStorePoller
from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.sources.base import Changeset, Replay, StateDelta
from bridge.sources.objects import ListingDiff, ReplayDiff, diff_listing
from bridge.sources.packed import DIGEST_SIZE, EMPTY_SLOT, PackedState, pack_etags
from bridge.sources.stores import StoredObject

MD5 = "9e107d9d372bb6826bd81d3542a419d6"
ETAG_FORMS = [
    MD5,  # S3 single-part upload, MemoryStore: packed
    "0" * 32,  # packs to the empty slot: kept unpacked
    "f" * 32,
    MD5.upper(),  # upper case: would not read back the same
    f'"{MD5}"',  # quoted, as in the S3 XML
    f"{MD5}-12",  # multipart upload
    "17f9c3a0b1c2d3e4-1f",  # LocalStore: <mtime_ns>-<size> in hex
    MD5[:31],
    MD5 + "0",
    " " + MD5[1:],
    MD5[:30] + " a",
    "",
    "é" * 32,
    "x",
]

etags = st.one_of(
    st.sampled_from(ETAG_FORMS),
    st.binary(min_size=16, max_size=16).map(bytes.hex),
    st.text(max_size=40),
)
# Few distinct paths, so that listings, states and deltas overlap; non-ASCII ones to check the
# order (code points), and prefixes of each other.
paths = st.text(alphabet="ab/é\U0001f600", min_size=1, max_size=4)


def obj(path: str, etag: str) -> StoredObject:
    return StoredObject(path, etag, len(path))


def paged(objects: Sequence[StoredObject], cuts: Sequence[int]) -> list[list[StoredObject]]:
    """``objects`` cut into pages at the given offsets (sorted, deduplicated)."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(objects)}), len(objects)]
    return [list(objects[a:b]) for a, b in pairwise(bounds)]


def reference(
    state: Mapping[str, str], listing: Sequence[StoredObject]
) -> tuple[list[ExternalEvent[StoredObject]], StateDelta]:
    """The plain dict diff: Added/Modified in listing order, then Removed sorted by path."""
    events: list[ExternalEvent[StoredObject]] = []
    delta: StateDelta = {}
    for o in listing:
        if o.path not in state:
            events.append(Added(o))
            delta[o.path] = o.etag
        elif state[o.path] != o.etag:
            events.append(Modified(o))
            delta[o.path] = o.etag
    listed = {o.path for o in listing}
    for path in sorted(set(state) - listed):
        events.append(Removed(StoredObject(path, state[path])))
        delta[path] = None
    return events, delta


def check_invariants(state: PackedState) -> None:
    keys = state.key_list
    assert keys == sorted(set(keys))
    assert len(state.digests) == DIGEST_SIZE * len(keys)
    empty = {
        key
        for i, key in enumerate(keys)
        if state.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] == EMPTY_SLOT
    }
    assert set(state.unpacked) == empty


# -- round trips -------------------------------------------------------------------------------


def test_every_etag_form_round_trips_exactly() -> None:
    mapping = {f"k{i:02}": etag for i, etag in enumerate(ETAG_FORMS)}
    state = PackedState(mapping)
    check_invariants(state)
    assert dict(state) == mapping
    assert dict(state.items()) == mapping
    assert list(state.values()) == [mapping[k] for k in sorted(mapping)]
    assert all(state[k] == v and state.etag_at(state.index(k)) == v for k, v in mapping.items())
    assert set(state.unpacked) == {k for k, v in mapping.items() if v not in (MD5, "f" * 32)}

    applied = PackedState()
    applied.apply(mapping)  # the same ETags, set by a delta
    check_invariants(applied)
    assert applied == mapping
    # Each form replaced by each other one, in place and through a rebuild.
    for shift in (1, 5):
        rotated = {k: ETAG_FORMS[(i + shift) % len(ETAG_FORMS)] for i, k in enumerate(mapping)}
        applied.apply(rotated)
        check_invariants(applied)
        assert dict(applied) == rotated
    applied.apply({"k00": None, "a-new-first-key": "0" * 32})
    check_invariants(applied)
    assert applied["a-new-first-key"] == "0" * 32
    assert "k00" not in applied


def test_every_etag_form_through_the_diff() -> None:
    mapping = {f"k{i:02}": etag for i, etag in enumerate(ETAG_FORMS)}
    state = PackedState(mapping)
    same = [obj(k, v) for k, v in sorted(mapping.items())]
    assert diff_listing(state, [same]).events == []
    assert diff_listing(state, [same[:5], same[5:]]).events == []
    # Every form against every other: Modified exactly when the strings differ.
    for shift in range(1, len(ETAG_FORMS)):
        listing = [obj(k, ETAG_FORMS[(i + shift) % len(ETAG_FORMS)]) for i, k in enumerate(mapping)]
        changes = diff_listing(state, [listing])
        assert changes.events == reference(mapping, listing)[0]
    # Removed events carry the ETag exactly.
    gone = diff_listing(state, [])
    assert gone.events == [Removed(StoredObject(k, mapping[k])) for k in sorted(mapping)]


def test_pack_etags() -> None:
    assert pack_etags([]) == (b"", [])
    assert pack_etags([MD5, "f" * 32]) == (bytes.fromhex(MD5) + b"\xff" * 16, [])
    packed, loose = pack_etags([MD5, "0" * 32, f"{MD5}-2", MD5.upper()])
    assert loose == [1, 2, 3]
    assert packed == bytes.fromhex(MD5) + EMPTY_SLOT * 3
    # A zero run across two slots is not an empty slot.
    halves = ["0" * 16 + "1" * 16, "1" * 16 + "0" * 16, "2" * 16 + "0" * 16]
    assert pack_etags([halves[1], halves[0]])[1] == []
    assert pack_etags([halves[2], "0" * 32])[1] == [1]


# -- the Mapping view --------------------------------------------------------------------------


def test_state_is_a_read_only_mapping_in_key_order() -> None:
    mapping = {"b": MD5, "a": f"{MD5}-3", "é": "0" * 32, "a/b": "f" * 32}
    state = PackedState(mapping)
    assert isinstance(state, Mapping)
    assert len(state) == 4
    assert list(state) == ["a", "a/b", "b", "é"]
    assert list(state.keys()) == list(state)
    assert state == mapping
    assert mapping == state
    assert state != {**mapping, "b": "0" * 32}
    assert state != {}
    assert PackedState() == {}
    assert state["a"] == f"{MD5}-3"
    with pytest.raises(KeyError):
        state["c"]
    assert state.get("c") is None
    assert state.get("c", "x") == "x"
    assert "a" in state
    assert "c" not in state
    assert None not in state
    assert 1 not in state  # type: ignore[comparison-overlap]  # never compared with the keys
    assert state.get(1) is None  # type: ignore[call-overload]
    assert ("a", f"{MD5}-3") in state.items()
    assert ("a", MD5) not in state.items()
    assert sorted(state.values()) == sorted(mapping.values())
    assert PackedState(state) == state  # a copy...
    copy = PackedState(state)
    copy.apply({"a": None})
    assert "a" in state  # ...that does not share its arrays
    assert "4 entries" in repr(state)
    assert not hasattr(state, "__setitem__")


def test_iterating_items_while_the_state_changes_fails() -> None:
    state = PackedState({f"k{i:05}": MD5 for i in range(10_000)})
    items = iter(state.items())
    next(items)
    state.apply({"k00001": None})
    with pytest.raises(RuntimeError, match="changed during iteration"):
        list(items)


def test_large_items_view() -> None:
    rng = random.Random(7)
    mapping = {f"{rng.getrandbits(64):016x}": f"{rng.getrandbits(128):032x}" for _ in range(10_000)}
    mapping.update({k: f"{v}-2" for k, v in list(mapping.items())[:50]})
    state = PackedState(mapping)
    assert list(state.items()) == sorted(mapping.items())


# -- deltas ------------------------------------------------------------------------------------


def dict_apply(state: dict[str, str], delta: Mapping[str, str | None]) -> None:
    for key, value in delta.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(paths, etags, max_size=30),
    st.lists(st.dictionaries(paths, st.one_of(st.none(), etags), max_size=20), max_size=4),
)
def test_apply_is_a_dict_update(initial: dict[str, str], deltas: list[StateDelta]) -> None:
    state = PackedState(initial)
    expected = dict(initial)
    for delta in deltas:
        state.apply(delta)
        dict_apply(expected, delta)
        check_invariants(state)
        assert dict(state.items()) == expected


@pytest.mark.parametrize("kind", ["mixed", "modify", "append", "prepend", "delete", "replace"])
def test_large_delta_merge(kind: str) -> None:
    rng = random.Random(kind)

    def key() -> str:
        return f"{rng.getrandbits(64):016x}/{rng.getrandbits(16)}"

    def etag() -> str:
        r = rng.random()
        return f"{rng.getrandbits(128):032x}" if r < 0.9 else f"{rng.getrandbits(128):032x}-{r:.3}"

    initial = {key(): etag() for _ in range(50_000)}
    keys = sorted(initial)
    delta: StateDelta
    if kind == "mixed":
        delta = {k: None for k in rng.sample(keys, 5_000)}
        delta.update({k: etag() for k in rng.sample(keys, 5_000)})
        delta.update({key(): etag() for _ in range(10_000)})
        delta.update({k + "x": None for k in rng.sample(keys, 100)})  # missing: no-ops
    elif kind == "modify":  # in place
        delta = {k: etag() for k in rng.sample(keys, 10_000)}
    elif kind == "append":
        delta = {f"~{i:06}": etag() for i in range(20_000)}
    elif kind == "prepend":
        delta = {f" {i:06}": etag() for i in range(20_000)}
    elif kind == "delete":
        delta = dict.fromkeys(keys[::2])
    else:
        delta = {**dict.fromkeys(keys), **{key(): etag() for _ in range(50_000)}}
    state = PackedState(initial)
    state.apply(delta)
    expected = dict(initial)
    dict_apply(expected, delta)
    check_invariants(state)
    assert dict(state.items()) == expected


def test_split_changeset_committed_part_by_part() -> None:
    rng = random.Random(3)
    before = {f"k{i:04}": f"{rng.getrandbits(128):032x}" for i in range(0, 2_000, 2)}
    listing = [obj(f"k{i:04}", f"{rng.getrandbits(128):032x}") for i in range(0, 2_000, 3)]
    state = PackedState(before)
    changeset = diff_listing(state, paged(listing, range(0, len(listing), 100)))
    parts = changeset.split(70)
    assert len(parts) > 10
    for part in parts:
        part.commit()
        check_invariants(state)
    assert dict(state.items()) == {o.path: o.etag for o in listing}


# -- the diff ----------------------------------------------------------------------------------


@st.composite
def state_and_listing(draw: st.DrawFn) -> tuple[dict[str, str], list[StoredObject]]:
    """A state, and a listing of it with some entries changed, dropped and added."""
    state = draw(st.dictionaries(paths, etags, max_size=40))
    listed: dict[str, str] = {}
    for path, etag in state.items():
        fate = draw(st.sampled_from(["same", "same", "same", "changed", "gone"]))
        if fate == "same":
            listed[path] = etag
        elif fate == "changed":
            listed[path] = draw(etags)
    listed.update(draw(st.dictionaries(paths, etags, max_size=10)))
    return state, [obj(path, etag) for path, etag in sorted(listed.items())]


@settings(max_examples=500, deadline=None)
@given(state_and_listing(), st.lists(st.integers(0, 50)), st.randoms(use_true_random=False))
def test_diff_matches_a_dict_diff(
    case: tuple[dict[str, str], list[StoredObject]], cuts: list[int], rng: random.Random
) -> None:
    mapping, listing = case
    if rng.random() < 0.3:  # out of key order: the whole listing, or from some page on
        start = rng.randrange(len(listing) + 1)
        tail = listing[start:]
        rng.shuffle(tail)
        listing = listing[:start] + tail
    expected_events, expected_delta = reference(mapping, listing)
    state = PackedState(mapping)
    changes = diff_listing(state, paged(listing, cuts))
    assert changes.events == expected_events
    assert changes.delta == expected_delta
    assert list(changes.delta) == list(expected_delta)
    assert state == mapping  # not committed
    changes.commit()
    check_invariants(state)
    assert dict(state.items()) == {o.path: o.etag for o in listing}
    # The same through a dict state, which the changeset commits into.
    plain = dict(mapping)
    changes = diff_listing(plain, paged(listing, cuts))
    assert changes.events == expected_events
    changes.commit()
    assert plain == {o.path: o.etag for o in listing}


def big_listing(n: int, seed: int = 1) -> dict[str, str]:
    rng = random.Random(seed)
    return {f"{rng.getrandbits(128):032x}": f"{rng.getrandbits(128):032x}" for _ in range(n)}


def pages_of(mapping: Mapping[str, str], size: int = 1000) -> list[list[StoredObject]]:
    objects = [obj(k, v) for k, v in sorted(mapping.items())]
    return [objects[i : i + size] for i in range(0, len(objects), size)]


def test_diff_of_a_large_listing_with_changes_on_some_pages() -> None:
    mapping = big_listing(20_000)
    keys = sorted(mapping)
    listed = dict(mapping)
    listed[keys[1500]] = f"{MD5}-2"  # page 1: modified, to an unpacked ETag
    del listed[keys[7000]]  # page 7: removed (its first path)
    del listed[keys[19_999]]  # the last path
    listed[keys[12_000] + "0"] = MD5  # page 12: added
    state = PackedState(mapping)
    state.apply({keys[3000]: "0" * 32})  # page 3: an unpacked ETag, unchanged
    listed[keys[3000]] = "0" * 32
    listing = [o for page in pages_of(listed) for o in page]
    changes = diff_listing(state, pages_of(listed))
    assert changes.events == reference(dict(state.items()), listing)[0]
    assert [type(e).__name__ for e in changes.events] == [
        "Modified",
        "Added",
        "Removed",
        "Removed",
    ]


def test_an_out_of_order_listing_is_diffed_by_dict(caplog: pytest.LogCaptureFixture) -> None:
    mapping = big_listing(5_000)
    keys = sorted(mapping)
    listed = {k: v for k, v in mapping.items() if k not in (keys[10], keys[4_000])}
    listed[keys[20]] = MD5
    listed["f" * 40] = MD5
    pages = pages_of(listed)
    pages[1], pages[3] = pages[3], pages[1]  # pages 0 and 1 in order, then back
    listing = [o for page in pages for o in page]
    caplog.set_level(logging.DEBUG, logger="bridge.sources.objects")
    changes = diff_listing(PackedState(mapping), pages)
    assert changes.events == reference(mapping, listing)[0]
    assert [type(e).__name__ for e in changes.events] == ["Modified", "Added", "Removed", "Removed"]
    assert "out of key order" in caplog.text
    # A page that is not sorted in itself, and a listing fully reversed.
    unsorted_page = [listing[:700] + listing[700:][::-1]]
    reversed_pages = [[o] for o in listing[::-1]]
    for pages in (unsorted_page, reversed_pages):
        flat = [o for page in pages for o in page]
        assert diff_listing(PackedState(mapping), pages).events == reference(mapping, flat)[0]


def test_a_diff_refuses_a_state_changed_under_it() -> None:
    state = PackedState({"a": MD5, "b": MD5})
    diff = ListingDiff(state)
    diff.feed([obj("a", MD5)])
    state.apply({"a": None})
    with pytest.raises(RuntimeError, match="state changed"):
        diff.feed([obj("b", MD5)])
    with pytest.raises(RuntimeError, match="state changed"):
        diff.finish()


def test_diff_listing_of_another_mapping_commits_into_a_copy() -> None:
    class Frozen(Mapping[str, str]):
        def __init__(self, data: dict[str, str]) -> None:
            self.data = data

        def __getitem__(self, key: str) -> str:
            return self.data[key]

        def __iter__(self) -> Any:
            return iter(self.data)

        def __len__(self) -> int:
            return len(self.data)

    frozen = Frozen({"a": MD5})
    changes: Changeset = diff_listing(frozen, [[obj("b", MD5)]])
    assert changes.events == [Added(obj("b", MD5)), Removed(StoredObject("a", MD5))]
    changes.commit()
    assert frozen.data == {"a": MD5}


# -- the poller --------------------------------------------------------------------------------


async def test_local_store_lists_in_key_order(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    names = ["b/a", "a0", "a/b/c", "a.b", "a/a", "é", "Z", "a-b/x", "b0", "a/b.c"]
    for name in names:
        await store.put(name, b"x")
    listed = [o.path async for page in store.list() for o in page]
    assert listed == sorted(names)


class QuotedEtags(LocalStore):
    """A store whose ETags are quoted (as some servers send them): none packs."""

    async def list(self, prefix: str = "") -> AsyncIterator[Sequence[StoredObject]]:
        async for page in super().list(prefix):
            yield [dataclasses.replace(o, etag=f'"{o.etag}"') for o in page]


async def test_poller_state_and_restore_keep_unpacked_etags(tmp_path: Path) -> None:
    store = QuotedEtags(tmp_path)
    await store.put("a", b"1")
    await store.put("b/c", b"22")
    poller = ObjectStorePoller(store)
    assert len(await poller.poll()) == 2
    state = poller.state()
    assert isinstance(state, PackedState)
    assert set(state.unpacked) == {"a", "b/c"}
    checkpoint = dict(state)
    successor = ObjectStorePoller(store)
    successor.restore(checkpoint)
    assert successor.state() == checkpoint
    assert await successor.poll() == []


async def test_poller_over_many_pages_with_mixed_etags() -> None:
    memory = MemoryStore(page_size=7)
    for i in range(100):
        await memory.put(f"k{i:03}", b"v%d" % i)
    poller = ObjectStorePoller(memory)
    assert len(await poller.poll()) == 100
    # Unpacked ETags in the state (a checkpoint written by another store, say).
    checkpoint = {**poller.state(), "k005": f"{MD5}-2", "k050": "0" * 32, "zzz": "gone"}
    poller.restore(checkpoint)
    await memory.put("k051", b"changed")
    await memory.delete("k099")
    events = await poller.poll()
    assert [(type(e).__name__, e.resource.path) for e in events] == [
        ("Modified", "k005"),
        ("Modified", "k050"),
        ("Modified", "k051"),
        ("Removed", "k099"),
        ("Removed", "zzz"),
    ]
    assert Removed(StoredObject("zzz", "gone")) in events
    assert await poller.poll() == []


@pytest.mark.parametrize("ordered", [True, False])
def test_replay_in_either_mode(ordered: bool) -> None:
    before = {"a": MD5, "b": "1" * 32, "k": "2" * 32, "z": "3" * 32}
    intent: StateDelta = {"a": "4" * 32, "b": None, "c": f"{MD5}-2"}
    after = {**before, "a": "4" * 32, "c": f"{MD5}-2"}
    del after["b"]
    listing = [obj("a", "4" * 32), obj("c", f"{MD5}-2"), obj("k", "5" * 32)]  # z is gone
    pages = [[o] for o in (listing if ordered else listing[::-1])]
    diff = ReplayDiff(PackedState(after), Replay(before, intent))
    for page in pages:
        diff.feed(page)
    changes = diff.finish()
    replayed: list[ExternalEvent[StoredObject]] = [
        Modified(obj("a", "4" * 32)),
        Added(obj("c", f"{MD5}-2")),
    ]
    modified: list[ExternalEvent[StoredObject]] = [Modified(obj("k", "5" * 32))]
    head = replayed + modified if ordered else modified + replayed[::-1]
    assert changes.events == [
        *head,
        Removed(StoredObject("z", "3" * 32)),
        Removed(StoredObject("b", "1" * 32)),
    ]
    assert changes.delta == {
        "a": "4" * 32,
        "c": f"{MD5}-2",
        "k": "5" * 32,
        "z": None,
        "b": None,
    }
