"""``LocalStore``: a directory tree as an object store.

Paths are relative to the root with ``/`` separators, listed in key order. The ETag is, by
``etag``:

* ``"mtime"`` (the default): the nanosecond mtime then the size, 16 hex digits each
  (:func:`local_etag`). Listing never reads file contents, so a large tree stays cheap to
  poll, and 32 hex digits pack into the poller's 16-byte state slots
  (:mod:`bridge.sources.packed`); a ``touch`` (or a rewrite with the same bytes) is a change.
  A rewrite that keeps both the size and the nanosecond mtime (only possible by resetting the
  mtime on purpose) is not seen. ETags of earlier versions, ``<mtime_ns>-<size>`` in hex, are
  converted when a checkpoint is restored (:meth:`LocalStore.migrate_etags`), so an upgrade
  reports no change.
* ``"content"``: a BLAKE2b-128 digest of the bytes, in hex (32 digits too). A file is read
  again only when its mtime, size or inode moved since the last listing (the digests are
  cached per file), so a poll of an unchanged tree costs what ``"mtime"`` costs plus a cache
  lookup; the first poll, and every changed file, costs a full read. The cache holds about
  150 bytes per file.

Listing (:meth:`LocalStore.list`) walks each directory once with ``os.scandir``, sorts its
entries by key and stats its files by name relative to the directory's descriptor; pages
(:class:`LocalPage`, up to 50,000 files) come in key order and hold columns, not objects: the
paths, the ETags' 16 bytes, the mtimes and sizes. The poller compares those bytes with its
packed state and builds a :class:`StoredObject` only for a file with an event, so an unchanged
tree costs one ``stat()``, one path string and two integers per file (about 1.2 times a bare
``os.scandir`` + ``stat()`` walk). Objects, ETags and events are those of earlier versions.

Symbolic links are followed to files, not into directories; files that vanish while the tree
is walked are skipped.

File names are bytes; keys are text. A name that is valid UTF-8 is its own key. A name that is
not (``bad\\xff.json``) is listed under a key where every byte that is not part of valid UTF-8
is written ``%XX`` (uppercase hex) and ``%`` itself ``%25`` (``bad%FF.json``), so its events can
be published; :func:`file_name` turns such a key back into the name: a key whose
percent-decoding is *not* valid UTF-8 names the file with those bytes, any other key is the
name itself. ``put``, ``delete`` and ``prefix`` take keys. The one ambiguity: a UTF-8 name
that spells the escape of another (a file literally named ``bad%FF.json``) has the same key;
``put``/``delete`` of that key act on the name that is not UTF-8, and should a folder hold both
(two files, or two directories), that one is listed and the other skipped, with a warning.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import sys
from array import array
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from operator import attrgetter, methodcaller
from pathlib import Path
from stat import S_ISREG
from typing import Literal, NamedTuple
from urllib.parse import unquote_to_bytes

from bridge.errors import StoreError
from bridge.sources.stores.base import PackedPage, StoredObject

__all__ = ["LocalEtag", "LocalPage", "LocalStore", "file_key", "file_name", "local_etag"]

log = logging.getLogger(__name__)

LocalEtag = Literal["mtime", "content"]
"""What a local file's ETag is made of (see the module docstring)."""
_MASK64 = (1 << 64) - 1
_READ_CHUNK = 1 << 20
_PAGE_FILES = 50_000
"""Files per page of a listing (each page is walked in one hop to a worker thread)."""
_SCANDIR_FD = os.scandir in os.supports_fd
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_is_dir = methodcaller("is_dir", follow_symlinks=False)
_stat = methodcaller("stat")
_mode, _mtime_ns, _size = attrgetter("st_mode"), attrgetter("st_mtime_ns"), attrgetter("st_size")


def local_etag(mtime_ns: int, size: int) -> str:
    """A file's ETag: 32 lowercase hex digits, its mtime (ns) then its size, 64 bits each."""
    return f"{mtime_ns & _MASK64:016x}{size & _MASK64:016x}"


def _upgraded(etag: str) -> str:
    """An ETag of an earlier version (``<mtime_ns>-<size>`` in hex) in today's form."""
    mtime, dash, size = etag.partition("-")
    if not dash:
        return etag
    try:
        return local_etag(int(mtime, 16), int(size, 16))
    except ValueError:
        return etag


def file_key(name: str) -> str:
    """The key of a file name as :func:`os.fsdecode` gives it (undecodable bytes as lone
    surrogates ``U+DC80``-``U+DCFF``): the name itself if it is valid UTF-8, else escaped (see
    the module docstring)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return name
    return "".join(_escape(ch) for ch in name)


def _escape(ch: str) -> str:
    if ch == "%":
        return "%25"
    if "\udc80" <= ch <= "\udcff":
        return f"%{ord(ch) - 0xDC00:02X}"
    return ch


def file_name(key: str) -> str:
    """The file name (as :func:`os.fsencode` takes it) of a key made by :func:`file_key`; a
    key of several ``/``-separated parts is turned back part by part."""
    if "%" not in key:
        return key
    return "/".join([_name_part(part) for part in key.split("/")])


def _name_part(part: str) -> str:
    raw = unquote_to_bytes(part)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(raw)
    return part


class LocalPage(PackedPage):
    """A page of a :class:`LocalStore` listing: paths, their ETags' 16 bytes, and per file its
    mtime (ns) and size (``stamps``, two entries per file), from which its object is built
    only when asked for (:meth:`object`)."""

    __slots__ = ("stamps",)

    def __init__(self, paths: list[str], digests: bytes, stamps: array[int]) -> None:
        super().__init__(paths, digests)
        self.stamps = stamps

    def object(self, index: int) -> StoredObject:
        mtime_ns, size = self.stamps[2 * index], self.stamps[2 * index + 1]
        return StoredObject(self.paths[index], self.etag(index), size, _mtime(mtime_ns))


def _mtime(mtime_ns: int) -> datetime:
    """``datetime.fromtimestamp(st.st_mtime, UTC)`` from ``st.st_mtime_ns``: the same float
    ``os.stat`` computes (seconds + nanoseconds * 1e-9), so the same microsecond."""
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds + nanoseconds * 1e-9, UTC)


class LocalStore:
    """Objects are the files under ``root``."""

    def __init__(self, root: str | os.PathLike[str], *, etag: LocalEtag = "mtime") -> None:
        if etag not in ("mtime", "content"):
            raise ValueError(f"etag must be 'mtime' or 'content', not {etag!r}")
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()
        self.etag: LocalEtag = etag
        self._digests: dict[str, tuple[int, int, int, bytes]] = {}
        """With etag "content": key -> (mtime_ns, size, inode, digest) of the last listing."""

    @staticmethod
    def migrate_etags(state: Mapping[str, str]) -> Mapping[str, str]:
        """``state`` with ETags of earlier versions converted (itself when there are none)."""
        if not any("-" in etag for etag in state.values()):
            return state
        return {path: _upgraded(etag) for path, etag in state.items()}

    async def put(self, path: str, data: bytes) -> None:
        target = self._resolve(path)
        await asyncio.to_thread(_write, target, data)

    async def delete(self, path: str) -> None:
        await asyncio.to_thread(self._resolve(path).unlink, missing_ok=True)

    async def list(self, prefix: str = "") -> AsyncIterator[Sequence[StoredObject]]:
        """:class:`LocalPage` pages of up to 50,000 files (about: a directory is not cut), in
        key order, each walked in a worker thread."""
        if not self.root.is_dir():
            raise StoreError(f"local store root {str(self.root)!r} is not a directory")
        start_rel = prefix.rpartition("/")[0]  # where _walk starts: it must be inside the root
        start = self.root / file_name(start_rel)
        if start_rel and not start.resolve().is_relative_to(self.root.resolve()):
            raise StoreError(f"prefix {prefix!r} leaves the local store root {str(self.root)!r}")
        pages = self._walk(prefix)
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            yield page

    def _resolve(self, path: str) -> Path:
        target = (self.root / file_name(path)).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise ValueError(f"path {path!r} leaves the store root {str(self.root)!r}")
        return target

    def _walk(self, prefix: str) -> Iterator[LocalPage]:
        """The pages of the files under ``prefix``, in key order.

        Starts at the deepest directory the prefix names. Each directory is listed once, its
        entries sorted by key (a directory's key ends in ``/``, so its files come where the
        key order puts them), its files stat-ed, and its directories walked depth first, so
        no global sort is needed. Per file: one ``stat()``, one path string and two integers;
        objects are built by the diff, only for the files that changed (:class:`LocalPage`).
        """
        start_rel = prefix.rpartition("/")[0]
        top = str(self.root / file_name(start_rel)) if start_rel else str(self.root)
        content = self.etag == "content"
        digests: dict[str, tuple[int, int, int, bytes]] = {}
        digest = functools.partial(self._digest, digests=digests) if content else None
        paths: list[str] = []
        mtimes: list[int] = []
        sizes: list[int] = []
        slots: list[bytes] = []  # etag "content": the digests
        first = _listed(top, start_rel, prefix, digest)
        stack = [first] if first is not None else []
        while stack:
            for item in stack[-1]:  # an iterator: resumes where it stopped
                if isinstance(item, _Folder):  # walk it, then the rest of this directory
                    listed = _listed(item.path, item.key, prefix, digest)
                    if listed is not None:
                        stack.append(listed)
                        break
                    continue
                paths += item.paths
                mtimes += item.mtimes
                sizes += item.sizes
                slots += item.digests
                if len(paths) >= _PAGE_FILES:
                    yield _page(paths, mtimes, sizes, slots if content else None)
                    paths, mtimes, sizes, slots = [], [], [], []
            else:
                stack.pop()
        if paths:
            yield _page(paths, mtimes, sizes, slots if content else None)
        if content:
            self._digests = digests  # files gone since the last listing are forgotten

    def _digest(
        self,
        key: str,
        path: str,
        st: os.stat_result,
        digests: dict[str, tuple[int, int, int, bytes]],
    ) -> bytes:
        """The content ETag of a file: cached while its mtime, size and inode stay."""
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._digests.get(key)
        fresh = cached is not None and cached[:3] == stamp
        digest = cached[3] if cached is not None and fresh else _file_digest(path)
        digests[key] = (*stamp, digest)
        return digest


class _Files(NamedTuple):
    """Files of a directory, in key order, in columns (``digests``: with etag "content")."""

    paths: list[str]
    mtimes: list[int]
    sizes: list[int]
    digests: list[bytes]


class _Folder(NamedTuple):
    """A directory to walk: where it is, and its key."""

    path: str
    key: str


_Digest = Callable[[str, str, os.stat_result], bytes]
"""The content ETag of a file: ``digest(key, path, stat)``."""


def _listed(
    directory: str, rel: str, prefix: str, digest: _Digest | None
) -> Iterator[_Files | _Folder] | None:
    """What ``directory`` (whose key is ``rel``) holds under ``prefix``, in key order: its files,
    stat-ed, and the directories to walk; None if it is gone. Files are stat-ed by name,
    relative to the directory's descriptor (fewer path lookups in the kernel), and before this
    returns, so one descriptor is open at a time."""
    try:
        fd = os.open(directory, _DIRECTORY_FLAGS) if _SCANDIR_FD else -1
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StoreError(f"cannot list {directory!r}: {exc}") from exc
    try:
        with os.scandir(fd if fd >= 0 else directory) as listing:
            found = list(listing)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StoreError(f"cannot list {directory!r}: {exc}") from exc
    else:
        return iter(_sorted_and_stated(found, directory, rel, prefix, digest))
    finally:
        if fd >= 0:
            os.close(fd)


def _sorted_and_stated(
    found: list[os.DirEntry[str]], directory: str, rel: str, prefix: str, digest: _Digest | None
) -> list[_Files | _Folder]:
    """The entries of a directory under ``prefix`` in key order, files stat-ed (in runs)."""
    base = f"{rel}/" if rel else ""
    names = [entry.name for entry in found]
    try:
        "".join(names).encode("utf-8")
    except UnicodeEncodeError:  # some name is not UTF-8
        keys = [file_key(name) for name in names]
    else:
        keys = names
    flags = list(map(_is_dir, found))
    folders = any(flags)
    if folders:
        keys = [f"{key}/" if flag else key for key, flag in zip(keys, flags, strict=True)]
    entries = dict(zip(keys, found, strict=True))
    if len(entries) < len(found):
        entries = _without_clashes(keys, found)
    if prefix and not base.startswith(prefix):
        entries = {
            key: entry
            for key, entry in entries.items()
            if (base + key).startswith(prefix) or (key[-1] == "/" and prefix.startswith(base + key))
        }
    ordered = sorted(entries)
    if not folders:
        return [_stat_files(base, ordered, entries, directory, digest)]
    items: list[_Files | _Folder] = []
    run: list[str] = []
    for key in ordered:
        if key[-1] == "/":
            name = entries[key].name
            items += (
                _stat_files(base, run, entries, directory, digest),
                _Folder(os.path.join(directory, name), base + key[:-1]),
            )
            run = []
        else:
            run.append(key)
    items.append(_stat_files(base, run, entries, directory, digest))
    return items


def _stat_files(
    base: str,
    keys: list[str],
    entries: dict[str, os.DirEntry[str]],
    directory: str,
    digest: _Digest | None,
) -> _Files:
    """The regular files among ``keys`` (of ``entries``, under ``base``), as columns: in
    C-level loops (``map``) while every entry stats as a regular file, else one by one."""
    found = list(map(entries.__getitem__, keys))
    if digest is None:
        try:
            stats = list(map(_stat, found))
        except FileNotFoundError:  # gone while walked, or a dangling link
            pass
        else:
            if all(map(S_ISREG, map(_mode, stats))):
                paths = list(map(base.__add__, keys))
                return _Files(paths, list(map(_mtime_ns, stats)), list(map(_size, stats)), [])
    files = _Files([], [], [], [])
    for key, entry in zip(keys, found, strict=True):
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        if not S_ISREG(st.st_mode):  # a link to a directory, a socket, a FIFO...
            continue
        path = base + key
        files.paths.append(path)
        files.mtimes.append(st.st_mtime_ns)
        files.sizes.append(st.st_size)
        if digest is not None:
            files.digests.append(digest(path, os.path.join(directory, entry.name), st))
    return files


def _without_clashes(keys: list[str], found: list[os.DirEntry[str]]) -> dict[str, os.DirEntry[str]]:
    """Key -> entry where two entries of a directory have one key (a name that is not UTF-8,
    escaped, next to one literally named so): the escaped one is kept (the one file_name turns
    the key into), with a warning."""
    entries: dict[str, os.DirEntry[str]] = {}
    for key, entry in zip(keys, found, strict=True):
        kept = entries.get(key)
        if kept is not None:
            log.warning(
                "local store: two files are listed under the key %r (a name that is not UTF-8, "
                "escaped, next to one literally named so); listing only one of them",
                key.rstrip("/"),
            )
            if file_key(kept.name) != kept.name:
                continue  # the escaped one is kept
        entries[key] = entry
    return entries


def _page(
    paths: list[str], mtimes: list[int], sizes: list[int], slots: list[bytes] | None
) -> LocalPage:
    """A page of files; their ETags are their digests (``slots``) or, without, their stamps:
    mtime (two's complement) then size, 64 bits each, big-endian (:func:`local_etag`)."""
    stamps = array("q", bytes(16 * len(paths)))
    stamps[0::2] = array("q", mtimes)
    stamps[1::2] = array("q", sizes)
    if slots is not None:
        return LocalPage(paths, b"".join(slots), stamps)
    packed = array("q", stamps)
    if sys.byteorder == "little":
        packed.byteswap()
    return LocalPage(paths, packed.tobytes(), stamps)


def _file_digest(path: str) -> bytes:
    """BLAKE2b-128 of the file's bytes (read in chunks: any size)."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            hasher.update(chunk)
    return hasher.digest()


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
