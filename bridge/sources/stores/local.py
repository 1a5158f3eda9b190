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

Symbolic links are followed to files, not into directories; files that vanish while the tree
is walked are skipped.

File names are bytes; keys are text. A name that is valid UTF-8 is its own key. A name that is
not (``bad\\xff.json``) is listed under a key where every byte that is not part of valid UTF-8
is written ``%XX`` (uppercase hex) and ``%`` itself ``%25`` (``bad%FF.json``), so its events can
be published; :func:`file_name` turns such a key back into the name: a key whose
percent-decoding is *not* valid UTF-8 names the file with those bytes, any other key is the
name itself. ``put``, ``delete`` and ``prefix`` take keys. The one ambiguity: a UTF-8 name
that spells the escape of another (a file literally named ``bad%FF.json``) has the same key;
``put``/``delete`` of that key act on the name that is not UTF-8, and should a folder hold both,
that one is listed and the other skipped, with a warning.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Literal
from urllib.parse import unquote_to_bytes

from bridge.errors import StoreError
from bridge.sources.stores.base import StoredObject

__all__ = ["LocalEtag", "LocalStore", "file_key", "file_name", "local_etag"]

log = logging.getLogger(__name__)

LocalEtag = Literal["mtime", "content"]
"""What a local file's ETag is made of (see the module docstring)."""
_MASK64 = (1 << 64) - 1
_READ_CHUNK = 1 << 20


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


class LocalStore:
    """Objects are the files under ``root``."""

    def __init__(self, root: str | os.PathLike[str], *, etag: LocalEtag = "mtime") -> None:
        if etag not in ("mtime", "content"):
            raise ValueError(f"etag must be 'mtime' or 'content', not {etag!r}")
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()
        self.etag: LocalEtag = etag
        self._digests: dict[str, tuple[int, int, int, str]] = {}
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
        if not self.root.is_dir():
            raise StoreError(f"local store root {str(self.root)!r} is not a directory")
        start_rel = prefix.rpartition("/")[0]  # where _walk starts: it must be inside the root
        start = self.root / file_name(start_rel)
        if start_rel and not start.resolve().is_relative_to(self.root.resolve()):
            raise StoreError(f"prefix {prefix!r} leaves the local store root {str(self.root)!r}")
        yield await asyncio.to_thread(self._walk, prefix)

    def _resolve(self, path: str) -> Path:
        target = (self.root / file_name(path)).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise ValueError(f"path {path!r} leaves the store root {str(self.root)!r}")
        return target

    def _walk(self, prefix: str) -> Sequence[StoredObject]:
        # Start at the deepest directory the prefix names, then filter by the full prefix.
        # Paths here are keys (file_key of each name); directories are walked by their real path.
        # ~1 us per file besides its stat() (1,000,000 files: a few seconds of CPU per poll):
        # names are looked up once, the ETag is one %-format, no call per file but stat().
        start_rel = prefix.rpartition("/")[0]
        found: list[StoredObject] = []
        append = found.append
        fromtimestamp = datetime.fromtimestamp
        content = self.etag == "content"
        digests: dict[str, tuple[int, int, int, str]] = {}
        escaped: set[int] = set()
        """The ids of the objects whose path has an escaped part (see _without_clashes)."""
        start = file_name(start_rel)
        top = str(self.root / start) if start_rel else str(self.root)
        pending = [(top, start_rel, start != start_rel)]
        while pending:
            directory, rel, rel_escaped = pending.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = list(listing)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise StoreError(f"cannot list {directory!r}: {exc}") from exc
            base = f"{rel}/" if rel else ""
            for entry in entries:
                name = file_key(entry.name)
                path = base + name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if path.startswith(prefix) or prefix.startswith(path + "/"):
                            is_escaped = rel_escaped or name is not entry.name
                            pending.append((entry.path, path, is_escaped))
                    elif entry.is_file() and path.startswith(prefix):
                        st = entry.stat()
                        size = st.st_size
                        mtime_ns = st.st_mtime_ns
                        if content:
                            etag = self._digest(path, entry.path, st, digests)
                        elif mtime_ns >= 0:
                            etag = "%016x%016x" % (mtime_ns, size)  # noqa: UP031 (the fastest)
                        else:
                            etag = local_etag(mtime_ns, size)
                        obj = StoredObject(path, etag, size, fromtimestamp(st.st_mtime, UTC))
                        if rel_escaped or name is not entry.name:
                            escaped.add(id(obj))
                        append(obj)
                except FileNotFoundError:
                    continue
        found.sort(key=attrgetter("path"))  # in key order, as S3 lists: the poller merges
        if content:
            self._digests = digests  # files gone since the last listing are forgotten
        return _without_clashes(found, escaped) if escaped else found

    def _digest(
        self,
        key: str,
        path: str,
        st: os.stat_result,
        digests: dict[str, tuple[int, int, int, str]],
    ) -> str:
        """The content ETag of a file: cached while its mtime, size and inode stay."""
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._digests.get(key)
        fresh = cached is not None and cached[:3] == stamp
        digest = cached[3] if cached is not None and fresh else _file_digest(path)
        digests[key] = (*stamp, digest)
        return digest


def _file_digest(path: str) -> str:
    """BLAKE2b-128 of the file's bytes, in hex (read in chunks: any size)."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _without_clashes(found: list[StoredObject], escaped: set[int]) -> list[StoredObject]:
    """``found`` (sorted) with each path once: where the key of a path with escaped parts
    equals a literal path, the escaped one is kept (the one file_name turns the key into)."""
    kept: list[StoredObject] = []
    for obj in found:
        if kept and kept[-1].path == obj.path:
            log.warning(
                "local store: two files are listed under the key %r (a name that is not UTF-8, "
                "escaped, next to one literally named so); listing only one of them",
                obj.path,
            )
            if id(obj) in escaped:
                kept[-1] = obj
            continue
        kept.append(obj)
    return kept


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
