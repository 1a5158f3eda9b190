"""``local:`` sources decide what a change is by ``etag``: ``mtime`` (the default: mtime and
size, so ``touch`` is a change) or ``content`` (a digest of the bytes, read again only when
mtime, size or inode moved)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge import Added, Modified, ObjectStorePoller, Removed
from bridge.errors import ConfigError
from bridge.service.config import parse_config
from bridge.sources.stores.local import LocalStore


async def kinds(poller: ObjectStorePoller) -> list[tuple[str, str]]:
    return [(type(event).__name__, event.resource.path) for event in await poller.poll()]


def touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


async def test_by_default_a_touch_is_a_change(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"one")
    poller = ObjectStorePoller(LocalStore(tmp_path))
    assert await kinds(poller) == [("Added", "a.txt")]
    touch(tmp_path / "a.txt")
    assert await kinds(poller) == [("Modified", "a.txt")]


async def test_content_etag_sees_bytes_not_times(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    a.write_bytes(b"one")
    b.parent.mkdir()
    b.write_bytes(b"two")
    store = LocalStore(tmp_path, etag="content")
    poller = ObjectStorePoller(store)
    assert await kinds(poller) == [("Added", "a.txt"), ("Added", "sub/b.txt")]
    touch(a)
    a.write_bytes(b"one")  # rewritten with the same bytes
    replacement = tmp_path / "b.new"
    replacement.write_bytes(b"two")
    replacement.replace(b)  # same bytes under a new inode
    assert await kinds(poller) == []
    a.write_bytes(b"uno")
    assert await kinds(poller) == [("Modified", "a.txt")]
    b.unlink()
    assert await kinds(poller) == [("Removed", "sub/b.txt")]
    assert set(store._digests) == {"a.txt"}  # the cache forgets files that are gone


async def test_content_etag_is_the_digest_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 << 20)  # larger than one read
    (tmp_path / "big.bin").write_bytes(data)
    events = await ObjectStorePoller(LocalStore(tmp_path, etag="content")).poll()
    assert len(events) == 1
    assert isinstance(events[0], Added)
    assert events[0].resource.etag == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert not isinstance(events[0], Modified | Removed)


async def test_content_etag_reads_a_file_only_when_its_stamp_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.sources.stores import local

    for n in range(5):
        (tmp_path / f"{n}.txt").write_bytes(b"x" * n)
    read: list[str] = []
    digest = local._file_digest

    def counting(path: str) -> bytes:
        read.append(Path(path).name)
        return digest(path)

    monkeypatch.setattr(local, "_file_digest", counting)
    poller = ObjectStorePoller(LocalStore(tmp_path, etag="content"))
    await poller.poll()
    assert sorted(read) == [f"{n}.txt" for n in range(5)]
    read.clear()
    await poller.poll()
    assert read == []
    touch(tmp_path / "3.txt")
    await poller.poll()
    assert read == ["3.txt"]


def test_config_key(tmp_path: Path) -> None:
    def config(etag: object) -> object:
        local = {"path": str(tmp_path), "etag": etag}
        raw = {
            "broker": {"url": "nats://127.0.0.1:4222"},
            "sources": [{"name": "f", "interval": 1, "local": local}],
        }
        return parse_config(raw, env={})

    assert config("content").sources[0].local.etag == "content"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"sources\[0\]\.local\.etag: .*mtime.*content"):
        config("sha1")
    with pytest.raises(ValueError, match="etag must be"):
        LocalStore(tmp_path, etag="sha1")  # type: ignore[arg-type]
