"""``ObjectStorePoller`` and the stores it lists.

One contract suite runs against every store: ``MemoryStore``, ``LocalStore`` (a temp dir) and
``S3Store`` (moto's S3 server, marked ``servers``). The poller's own semantics (each change
reported once, removals after a restore, the changeset contract, pagination) follow, over the
in-process stores.

Modifications always change the content's length: ``LocalStore``'s ETag is mtime and size,
and on kernels with coarse file timestamps two writes in the same tick share an mtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pytest

from bridge import (
    Added,
    ExternalEvent,
    LocalStore,
    MemoryStore,
    Modified,
    ObjectStore,
    ObjectStorePoller,
    Removed,
    StoredObject,
    StoreError,
)
from bridge.sources.objects import diff_listing


class WritableStore(ObjectStore, Protocol):
    """A store the tests can also write to (all three built-in stores can)."""

    async def put(self, path: str, data: bytes) -> object: ...

    async def delete(self, path: str) -> None: ...


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.servers)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[WritableStore]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        yield LocalStore(root)
    else:
        from bridge import S3Store

        s3_server = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        s3 = S3Store(
            bucket,
            endpoint_url=s3_server.endpoint_url,
            region_name=s3_server.region,
            aws_access_key_id=s3_server.access_key,
            aws_secret_access_key=s3_server.secret_key,
        )
        try:
            yield s3
        finally:
            await s3.aclose()


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


async def listing(store: ObjectStore, prefix: str = "") -> dict[str, StoredObject]:
    """Every object under ``prefix``, by path; fails on a path listed twice."""
    found: dict[str, StoredObject] = {}
    async for page in store.list(prefix):
        for obj in page:
            assert obj.path not in found, f"{obj.path} listed twice"
            found[obj.path] = obj
    return found


async def put_all(store: WritableStore, objects: dict[str, bytes]) -> None:
    for path, data in objects.items():
        await store.put(path, data)


def kinds(events: Sequence[ExternalEvent[StoredObject]]) -> set[tuple[str, str]]:
    return {(type(e).__name__, e.resource.path) for e in events}


# -- the store contract: every store -------------------------------------------------------


async def test_put_list_delete(store: WritableStore) -> None:
    await store.put("a.txt", b"alpha")
    await store.put("dir/b.txt", b"bravo!")
    found = await listing(store)
    assert set(found) == {"a.txt", "dir/b.txt"}
    assert (found["a.txt"].size, found["dir/b.txt"].size) == (5, 6)
    for obj in found.values():
        assert obj.etag
        assert '"' not in obj.etag
        assert isinstance(obj.last_modified, datetime)
        assert obj.last_modified.tzinfo is not None
        assert (obj.key, obj.version) == (obj.path, obj.etag)
    await store.delete("a.txt")
    assert set(await listing(store)) == {"dir/b.txt"}
    await store.delete("never-existed.txt")  # deleting a missing path is not an error
    assert set(await listing(store)) == {"dir/b.txt"}


async def test_an_empty_store_lists_nothing(store: WritableStore) -> None:
    assert await listing(store) == {}
    assert await listing(store, "some/prefix/") == {}


async def test_etag_is_stable_and_follows_the_content(store: WritableStore) -> None:
    await store.put("x.json", b"1")
    first = (await listing(store))["x.json"].etag
    assert (await listing(store))["x.json"].etag == first  # listing twice changes nothing
    await store.put("x.json", b"22")
    assert (await listing(store))["x.json"].etag != first


async def test_prefix_listing(store: WritableStore) -> None:
    await put_all(
        store,
        {
            "configs/a.json": b"a",
            "configs/b.json": b"b",
            "configs/nested/c.json": b"c",
            "config.yaml": b"y",
            "other/d.json": b"d",
        },
    )
    assert set(await listing(store, "configs/")) == {
        "configs/a.json",
        "configs/b.json",
        "configs/nested/c.json",
    }
    assert set(await listing(store, "config")) == {
        "configs/a.json",
        "configs/b.json",
        "configs/nested/c.json",
        "config.yaml",
    }
    assert set(await listing(store, "configs/a")) == {"configs/a.json"}  # part of a file name
    assert set(await listing(store, "configs/nested/")) == {"configs/nested/c.json"}
    assert await listing(store, "missing/") == {}


async def test_poller_reports_each_change_once(store: WritableStore) -> None:
    await put_all(store, {"keep.txt": b"k", "change.txt": b"c", "drop.txt": b"d"})
    poller = ObjectStorePoller(store)
    first = await poller.poll()
    assert kinds(first) == {("Added", "keep.txt"), ("Added", "change.txt"), ("Added", "drop.txt")}
    assert await poller.poll() == []

    # Three kinds of change in one tick come out together, in one poll.
    await store.put("change.txt", b"changed")
    await store.delete("drop.txt")
    await store.put("new.txt", b"n")
    listed = await listing(store)
    second = await poller.poll()
    assert kinds(second) == {
        ("Modified", "change.txt"),
        ("Removed", "drop.txt"),
        ("Added", "new.txt"),
    }
    by_path = {e.resource.path: e for e in second}
    assert by_path["change.txt"] == Modified(listed["change.txt"])
    assert by_path["new.txt"] == Added(listed["new.txt"])
    dropped = next(e for e in first if e.resource.path == "drop.txt").resource
    assert by_path["drop.txt"] == Removed(StoredObject("drop.txt", dropped.etag))
    assert await poller.poll() == []
    assert dict(poller.state()) == {path: obj.etag for path, obj in listed.items()}


async def test_poller_with_a_prefix_ignores_the_rest(store: WritableStore) -> None:
    await put_all(store, {"app/a.yaml": b"a", "app-old/b.yaml": b"b", "c.yaml": b"c"})
    poller = ObjectStorePoller(store).with_prefix("app/")
    assert poller.name == f"{store.uri}/app/"
    assert kinds(await poller.poll()) == {("Added", "app/a.yaml")}
    await store.put("app-old/b.yaml", b"bb")
    await store.delete("c.yaml")
    await store.put("d.yaml", b"d")
    assert await poller.poll() == []
    await store.delete("app/a.yaml")
    assert kinds(await poller.poll()) == {("Removed", "app/a.yaml")}


async def test_removed_after_restore(store: WritableStore) -> None:
    await put_all(store, {"a": b"a", "b": b"b", "c": b"c"})
    watching = ObjectStorePoller(store)
    await watching.poll()
    checkpoint = dict(watching.state())
    # While nobody watches: b is deleted, c changes, d appears.
    await store.delete("b")
    await store.put("c", b"c2")
    await store.put("d", b"d")
    successor = ObjectStorePoller(store)
    successor.restore(checkpoint)
    events = await successor.poll()
    assert kinds(events) == {("Removed", "b"), ("Modified", "c"), ("Added", "d")}
    assert Removed(StoredObject("b", checkpoint["b"])) in events  # nothing re-Added for a


# -- the poller over the in-process stores --------------------------------------------------


@pytest.fixture(params=["memory", "local"])
def local_store(request: pytest.FixtureRequest, local_root: Path) -> WritableStore:
    return MemoryStore() if request.param == "memory" else LocalStore(local_root)


async def test_events_in_listing_order_removals_last_sorted(local_store: WritableStore) -> None:
    await put_all(local_store, {"r2": b"x", "r1": b"x", "m": b"x"})
    poller = ObjectStorePoller(local_store)
    await poller.poll()
    await local_store.delete("r2")
    await local_store.delete("r1")
    await local_store.put("m", b"longer")
    await local_store.put("a", b"x")
    events = await poller.poll()
    listed_order = [p for p in await listing(local_store) if p in {"a", "m"}]
    head = [(type(e).__name__, e.resource.path) for e in events[:2]]
    assert head == [("Added" if p == "a" else "Modified", p) for p in listed_order]
    assert [(type(e).__name__, e.resource.path) for e in events[2:]] == [
        ("Removed", "r1"),
        ("Removed", "r2"),
    ]


async def test_changes_leave_the_state_alone_until_commit(local_store: WritableStore) -> None:
    await put_all(local_store, {"a": b"a", "b": b"b"})
    poller = ObjectStorePoller(local_store)
    pending = await poller.changes()
    assert kinds(pending.events) == {("Added", "a"), ("Added", "b")}
    listed = await listing(local_store)
    assert pending.delta == {"a": listed["a"].etag, "b": listed["b"].etag}
    assert poller.state() == {}
    assert kinds((await poller.changes()).events) == kinds(pending.events)  # still pending
    pending.commit()
    assert dict(poller.state()) == {"a": listed["a"].etag, "b": listed["b"].etag}
    assert pending.delta == {}

    await local_store.delete("a")
    await local_store.put("b", b"bb")
    await local_store.put("c", b"c")
    listed = await listing(local_store)
    pending = await poller.changes()
    assert pending.delta == {"a": None, "b": listed["b"].etag, "c": listed["c"].etag}
    assert set(poller.state()) == {"a", "b"}  # unchanged: a still there, no c
    pending.commit()
    assert dict(poller.state()) == {"b": listed["b"].etag, "c": listed["c"].etag}
    assert (await poller.changes()).events == []


async def test_each_change_is_reported_exactly_once_over_many_ticks(
    local_store: WritableStore,
) -> None:
    poller = ObjectStorePoller(local_store)
    assert await poller.poll() == []
    ticks: list[set[tuple[str, str]]] = []
    for step in range(5):
        await local_store.put(f"obj-{step}", b"v" * (step + 1))
        if step >= 2:
            await local_store.put(f"obj-{step - 2}", b"w" * (step + 10))
        if step == 4:
            await local_store.delete("obj-0")
        events = await poller.poll()
        ticks.append(kinds(events))
        assert len(events) == len(ticks[-1])  # no path twice in one poll
        assert await poller.poll() == []
    assert ticks == [
        {("Added", "obj-0")},
        {("Added", "obj-1")},
        {("Added", "obj-2"), ("Modified", "obj-0")},
        {("Added", "obj-3"), ("Modified", "obj-1")},
        {("Added", "obj-4"), ("Modified", "obj-2"), ("Removed", "obj-0")},
    ]


async def test_memory_store_pages_and_the_poller_reads_them_all() -> None:
    memory = MemoryStore(page_size=2)
    await put_all(memory, {f"k{i}": f"v{i}".encode() for i in range(5)})
    pages = [list(page) async for page in memory.list()]
    assert [len(page) for page in pages] == [2, 2, 1]
    poller = ObjectStorePoller(memory)
    assert kinds(await poller.poll()) == {("Added", f"k{i}") for i in range(5)}
    await memory.delete("k1")  # on the first page
    await memory.delete("k4")  # on the last page
    await memory.put("k2", b"changed")  # on the second page
    assert kinds(await poller.poll()) == {("Removed", "k1"), ("Removed", "k4"), ("Modified", "k2")}
    assert await poller.poll() == []


async def test_memory_store_etag_is_the_md5_of_the_content() -> None:
    memory = MemoryStore("etags")
    obj = await memory.put("x", b"content")
    assert obj.etag == hashlib.md5(b"content").hexdigest()
    assert (await listing(memory))["x"] == obj
    assert await memory.get("x") == b"content"
    assert memory.uri == "memory://etags"


async def test_local_store_nested_dirs_and_partial_prefixes(local_root: Path) -> None:
    store = LocalStore(local_root)
    await put_all(
        store,
        {"a/b/c/d.txt": b"d", "a/bz.txt": b"z", "a/b.txt": b"b", "a/x/y.txt": b"y", "top": b"t"},
    )
    assert set(await listing(store)) == {"a/b/c/d.txt", "a/bz.txt", "a/b.txt", "a/x/y.txt", "top"}
    assert set(await listing(store, "a/b")) == {"a/b/c/d.txt", "a/bz.txt", "a/b.txt"}
    assert set(await listing(store, "a/b/")) == {"a/b/c/d.txt"}
    assert set(await listing(store, "a/b/c/d")) == {"a/b/c/d.txt"}
    assert set(await listing(store, "a/b/c/e")) == set()
    assert set(await listing(store, "t")) == {"top"}
    assert set(await listing(store, "top/")) == set()  # a file is not a directory
    poller = ObjectStorePoller(store).with_prefix("a/b")
    assert kinds(await poller.poll()) == {
        ("Added", "a/b/c/d.txt"),
        ("Added", "a/bz.txt"),
        ("Added", "a/b.txt"),
    }
    (local_root / "a" / "b" / "c" / "d.txt").unlink()
    assert kinds(await poller.poll()) == {("Removed", "a/b/c/d.txt")}


async def test_local_store_sees_files_written_by_others(local_root: Path) -> None:
    store = LocalStore(local_root)
    poller = ObjectStorePoller(store)
    (local_root / "sub").mkdir()
    (local_root / "sub" / "f.conf").write_bytes(b"one")
    (added,) = await poller.poll()
    assert added.resource.path == "sub/f.conf"
    assert added.resource.size == 3
    (local_root / "sub" / "f.conf").write_bytes(b"three")
    (modified,) = await poller.poll()
    assert isinstance(modified, Modified)
    assert modified.resource.size == 5
    assert modified.resource.etag != added.resource.etag


async def test_local_store_missing_root_is_a_store_error(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    store = LocalStore(missing)
    with pytest.raises(StoreError, match=r"not-there.*is not a directory"):
        await listing(store)
    with pytest.raises(StoreError):
        await ObjectStorePoller(store).poll()


async def test_local_store_refuses_paths_outside_its_root(local_root: Path) -> None:
    store = LocalStore(local_root)
    with pytest.raises(ValueError, match="leaves the store root"):
        await store.put("../escape.txt", b"x")
    with pytest.raises(ValueError, match="leaves the store root"):
        await store.delete("a/../../escape.txt")
    assert not (local_root.parent / "escape.txt").exists()


@pytest.mark.parametrize("prefix", ["../", "../outside", "a/../../", "/etc/"])
async def test_local_store_refuses_prefixes_outside_its_root(local_root: Path, prefix: str) -> None:
    (local_root.parent / "outside.txt").write_bytes(b"not in the store")
    (local_root / "a").mkdir()
    store = LocalStore(local_root)
    with pytest.raises(StoreError, match="leaves the local store root"):
        await listing(store, prefix)


def test_poller_names() -> None:
    memory = MemoryStore("names")
    assert ObjectStorePoller(memory).name == "memory://names"
    assert ObjectStorePoller(memory).with_prefix("p/").name == "memory://names/p/"
    assert ObjectStorePoller(memory).with_prefix("p/").with_name("cfg").name == "cfg"


def test_diff_listing_over_pages() -> None:
    state = {"a": "1", "b": "2", "c": "3"}
    pages: list[list[StoredObject]] = [
        [StoredObject("a", "1"), StoredObject("d", "4")],
        [StoredObject("c", "30")],
    ]
    changes = diff_listing(state, pages)
    expected: list[ExternalEvent[Any]] = [
        Added(StoredObject("d", "4")),
        Modified(StoredObject("c", "30")),
        Removed(StoredObject("b", "2")),
    ]
    assert changes.events == expected
    assert changes.delta == {"d": "4", "c": "30", "b": None}
    assert state == {"a": "1", "b": "2", "c": "3"}  # not committed
