"""``LocalStore``'s ETags fit the packed state (16 bytes per object, nothing in ``unpacked``),
and checkpoints holding the ETags of earlier versions restore without reporting a change."""

from __future__ import annotations

import os
from pathlib import Path

from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import LocalStore
from bridge.sources.stores.local import local_etag


def tree(root: Path, count: int) -> None:
    for i in range(count):
        folder = root / f"d{i % 7}" / ("deep" if i % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:04}.txt").write_text("x" * i)


async def test_local_etags_pack_into_the_state(tmp_path: Path) -> None:
    tree(tmp_path, 300)
    poller = ObjectStorePoller(LocalStore(tmp_path)).with_name("files")
    poller.restore({})
    changeset = await poller.changes()
    changeset.commit()
    assert len(changeset.events) == 300
    state = poller._tracked
    assert len(state) == 300
    assert state.unpacked == {}  # every ETag in its 16-byte slot
    path = tmp_path / "d1" / "deep" / "f0001.txt"
    st = path.stat()
    assert state["d1/deep/f0001.txt"] == local_etag(st.st_mtime_ns, st.st_size)
    assert len(local_etag(st.st_mtime_ns, st.st_size)) == 32
    assert local_etag(-1, 5) != local_etag(2**64 - 1, 4)  # a negative mtime stays distinct


async def test_a_checkpoint_of_an_earlier_version_restores_without_changes(
    tmp_path: Path,
) -> None:
    tree(tmp_path, 50)
    earlier = {}
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            full = Path(folder) / name
            st = full.stat()
            earlier[full.relative_to(tmp_path).as_posix()] = f"{st.st_mtime_ns:x}-{st.st_size:x}"
    poller = ObjectStorePoller(LocalStore(tmp_path)).with_name("files")
    poller.restore(earlier)
    assert (await poller.changes()).events == []
    (tmp_path / "d0" / "f0000.txt").write_text("changed")
    [event] = (await poller.changes()).events
    assert (event.kind, event.resource.path) == ("modified", "d0/f0000.txt")
