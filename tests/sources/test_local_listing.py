"""``LocalStore``'s listing (pages of paths and 16-byte ETag slots, in key order) and the diff
of such pages (objects built only for the entries with an event).

What the default ETag (mtime ns, size) guarantees: a change of size or of the nanosecond mtime
is a change, whatever the clock's granularity; a file replaced by one with the same mtime and
size (only possible by setting the mtime on purpose) is not. ``etag="content"`` sees that
replacement: a new inode makes it read the file again.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.sources.objects import ObjectStorePoller, _differing_slots, diff_listing
from bridge.sources.packed import PackedState
from bridge.sources.stores import StoredObject
from bridge.sources.stores import local as local_module
from bridge.sources.stores.base import PackedPage
from bridge.sources.stores.local import LocalPage, LocalStore, local_etag


async def kinds(poller: ObjectStorePoller) -> list[tuple[str, str]]:
    return [(event.kind, event.resource.path) for event in await poller.poll()]


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


async def listed(store: LocalStore, prefix: str = "") -> list[StoredObject]:
    return [obj async for page in store.list(prefix) for obj in page]


# -- what the ETag guarantees --


async def test_a_new_size_with_the_same_mtime_is_a_change(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_bytes(b"one")
    mtime_ns = file.stat().st_mtime_ns
    poller = ObjectStorePoller(LocalStore(tmp_path))
    assert await kinds(poller) == [("added", "a.txt")]
    file.write_bytes(b"three")
    set_mtime(file, mtime_ns)  # written within the same tick of a coarse clock
    assert await kinds(poller) == [("modified", "a.txt")]


async def test_a_new_mtime_by_one_nanosecond_is_a_change(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_bytes(b"one")
    poller = ObjectStorePoller(LocalStore(tmp_path))
    await poller.poll()
    set_mtime(file, file.stat().st_mtime_ns + 1)
    assert await kinds(poller) == [("modified", "a.txt")]


async def test_a_replacement_with_the_same_stat_is_seen_by_content_etags_only(
    tmp_path: Path,
) -> None:
    file = tmp_path / "a.txt"
    file.write_bytes(b"one")
    mtime_ns = file.stat().st_mtime_ns
    by_stat = ObjectStorePoller(LocalStore(tmp_path))
    by_content = ObjectStorePoller(LocalStore(tmp_path, etag="content"))
    await by_stat.poll()
    await by_content.poll()
    replacement = tmp_path / "new.tmp"
    replacement.write_bytes(b"two")  # same size
    set_mtime(replacement, mtime_ns)  # same mtime, on purpose
    replacement.replace(file)  # a new inode
    assert await kinds(by_stat) == []  # the documented blind spot of etag "mtime"
    assert await kinds(by_content) == [("modified", "a.txt")]


async def test_the_all_zero_etag_is_compared_as_text(tmp_path: Path) -> None:
    """An empty file dated 1970-01-01 has the ETag of 32 zeros, which the packed state keeps
    outside its slots: an unchanged poll is still quiet, and a change still seen."""
    file = tmp_path / "epoch.txt"
    file.touch()
    set_mtime(file, 0)
    (tmp_path / "other.txt").write_bytes(b"x")
    poller = ObjectStorePoller(LocalStore(tmp_path))
    assert sorted(await kinds(poller)) == [("added", "epoch.txt"), ("added", "other.txt")]
    assert poller._tracked.unpacked == {"epoch.txt": "0" * 32}
    assert await kinds(poller) == []
    set_mtime(file, 1)
    assert await kinds(poller) == [("modified", "epoch.txt")]
    assert await kinds(poller) == []
    set_mtime(file, 0)
    poller.restore({"epoch.txt": '"stale"', "other.txt": poller.state()["other.txt"]})
    assert await kinds(poller) == [("modified", "epoch.txt")]  # two ETags outside the slots


@pytest.mark.parametrize(
    "mtime_ns",
    [0, 1, 999, 1_700_000_000_123_456_789, 1_700_000_000_000_000_500, -1, -1_500_000_001],
)
async def test_objects_carry_what_stat_says(tmp_path: Path, mtime_ns: int) -> None:
    file = tmp_path / "a.bin"
    file.write_bytes(b"12345")
    try:
        set_mtime(file, mtime_ns)
    except OSError:
        pytest.skip(f"this file system does not take the mtime {mtime_ns}")
    st = file.stat()
    [obj] = await listed(LocalStore(tmp_path))
    assert obj == StoredObject(
        "a.bin",
        local_etag(st.st_mtime_ns, st.st_size),
        5,
        datetime.fromtimestamp(st.st_mtime, UTC),  # what earlier versions published
    )


# -- the listing --


NAMES = ["a.txt", "a/b.txt", "a/c/d.txt", "a-b/c.txt", "a0", "b/a", "b.txt", "z", "é.txt"]


def make(root: Path, names: Sequence[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.fsencode(name))


async def test_listing_is_in_key_order_over_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make(tmp_path, NAMES)
    monkeypatch.setattr(local_module, "_PAGE_FILES", 2)
    pages = [page async for page in LocalStore(tmp_path).list()]
    assert len(pages) > 1
    assert all(isinstance(page, LocalPage) for page in pages)
    assert [obj.path for page in pages for obj in page] == sorted(NAMES)


async def test_listing_with_a_prefix(tmp_path: Path) -> None:
    make(tmp_path, NAMES)
    store = LocalStore(tmp_path)
    under_a = ["a-b/c.txt", "a.txt", "a/b.txt", "a/c/d.txt", "a0"]  # in key order
    assert [o.path for o in await listed(store, "a")] == under_a
    assert [o.path for o in await listed(store, "a/")] == ["a/b.txt", "a/c/d.txt"]
    assert [o.path for o in await listed(store, "a/c")] == ["a/c/d.txt"]
    assert [o.path for o in await listed(store, "b")] == ["b.txt", "b/a"]


async def test_links_to_files_are_listed_others_not(tmp_path: Path) -> None:
    make(tmp_path, ["real.txt", "dir/inside.txt"])
    (tmp_path / "to-file").symlink_to(tmp_path / "real.txt")
    (tmp_path / "to-dir").symlink_to(tmp_path / "dir")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")
    assert [o.path for o in await listed(LocalStore(tmp_path))] == [
        "dir/inside.txt",
        "real.txt",
        "to-file",
    ]


async def test_two_folders_with_one_key_are_listed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make(tmp_path, [os.fsdecode(b"x\xff/one"), "x%FF/two"])
    assert [o.path for o in await listed(LocalStore(tmp_path))] == ["x%FF/one"]
    assert "two files are listed under the key 'x%FF'" in caplog.text


async def test_a_poll_over_pages_reports_changes_in_the_middle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"d{i // 10}/f{i:03}" for i in range(100)]
    make(tmp_path, names)
    monkeypatch.setattr(local_module, "_PAGE_FILES", 7)
    poller = ObjectStorePoller(LocalStore(tmp_path))
    assert len(await poller.poll()) == 100
    assert await poller.poll() == []
    (tmp_path / "d4" / "f042").write_bytes(b"longer than before")
    (tmp_path / "d5" / "f055").unlink()
    (tmp_path / "d6" / "f066b").write_bytes(b"new")
    assert await kinds(poller) == [
        ("modified", "d4/f042"),
        ("added", "d6/f066b"),
        ("removed", "d5/f055"),
    ]
    assert await poller.poll() == []


# -- the diff of packed pages --


class CountingPage(PackedPage):
    """A page that counts the objects built from it."""

    built = 0

    def object(self, index: int) -> StoredObject:
        CountingPage.built += 1
        return super().object(index)


def packed_page(objects: Sequence[StoredObject]) -> CountingPage:
    return CountingPage([o.path for o in objects], b"".join(bytes.fromhex(o.etag) for o in objects))


def etag(n: int) -> str:
    return f"{n:032x}"


def test_the_diff_builds_objects_only_for_entries_with_an_event() -> None:
    objects = [StoredObject(f"k{i:05}", etag(i + 1)) for i in range(1000)]
    state = PackedState({o.path: o.etag for o in objects})
    CountingPage.built = 0
    assert diff_listing(state, [packed_page(objects)]).events == []
    assert CountingPage.built == 0
    changed = [*objects]
    changed[500] = StoredObject("k00500", etag(7777))
    [event] = diff_listing(state, [packed_page(changed)]).events
    assert (event.kind, event.resource) == ("modified", changed[500])
    assert CountingPage.built == 1


def scenario(rng: random.Random, etags: Sequence[str]) -> tuple[dict[str, str], list[StoredObject]]:
    """A state and a listing (sorted) with removals, additions and modifications, whose ETags
    are drawn mostly from ``etags`` (so equal and unequal ones both come up)."""

    def draw() -> str:
        return rng.choice(etags) if rng.random() < 0.7 else etag(rng.randrange(1, 1 << 64))

    paths = sorted({f"p{rng.randrange(400):04}" for _ in range(rng.randrange(1, 200))})
    state = {path: draw() for path in paths}
    listing = []
    for path in sorted({*paths, *(f"p{rng.randrange(400):04}" for _ in range(20))}):
        roll = rng.random()
        if path in state and roll < 0.1:
            continue  # removed
        value = state.get(path) if roll < 0.8 else None
        listing.append(StoredObject(path, value or draw()))
    return state, listing


def expected_events(state: dict[str, str], listing: list[StoredObject]) -> list[object]:
    """The events of a listing, by the definition (a reference for the diff)."""
    events: list[object] = []
    for obj in listing:
        if obj.path not in state:
            events.append(("added", obj))
        elif state[obj.path] != obj.etag:
            events.append(("modified", obj))
    listed = {obj.path for obj in listing}
    gone = sorted(path for path in state if path not in listed)
    return [*events, *(("removed", StoredObject(path, state[path])) for path in gone)]


def cut(rng: random.Random, listing: list[StoredObject]) -> list[list[StoredObject]]:
    cuts = sorted(rng.sample(range(1, len(listing)), min(3, len(listing) - 1)))
    return [listing[a:b] for a, b in itertools.pairwise([0, *cuts, len(listing)]) if b > a]


PACKABLE = [etag(0), etag(1), etag(2)]  # the all-zero one is kept outside the slots
UNPACKABLE = [*PACKABLE, '"quoted"', '"other"', "ABCDEF" * 5 + "AB", "abc-2"]


@pytest.mark.parametrize("seed", range(40))
def test_packed_pages_diff_by_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    state, listing = scenario(rng, PACKABLE)
    found = diff_listing(PackedState(state), [packed_page(page) for page in cut(rng, listing)])
    assert [(e.kind, e.resource) for e in found.events] == expected_events(state, listing)


@pytest.mark.parametrize("seed", range(40))
def test_lists_of_objects_diff_by_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    state, listing = scenario(rng, UNPACKABLE)
    found = diff_listing(PackedState(state), cut(rng, listing))
    assert [(e.kind, e.resource) for e in found.events] == expected_events(state, listing)


@pytest.mark.parametrize("seed", range(20))
def test_differing_slots_are_found(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 300)
    a = bytearray(rng.randbytes(16 * n))
    b = bytearray(a)
    changed = sorted(rng.sample(range(n), rng.randrange(0, min(n, 12) + 1)))
    for i in changed:
        b[16 * i + rng.randrange(16)] ^= 1 << rng.randrange(8)
    assert sorted(_differing_slots(bytes(a), bytes(b))) == changed
