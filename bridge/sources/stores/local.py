"""``LocalStore``: a directory tree as an object store.

Paths are relative to the root with ``/`` separators, listed in key order. The ETag is the
nanosecond mtime then the size, 16 hex digits each (:func:`local_etag`): listing never reads
file contents, so a large tree stays cheap to poll, and 32 hex digits pack into the poller's
16-byte state slots (:mod:`bridge.sources.packed`). ETags of earlier versions,
``<mtime_ns>-<size>`` in hex, are converted when a checkpoint is restored
(:meth:`LocalStore.migrate_etags`), so an upgrade reports no change.
A rewrite that keeps both the size and the nanosecond mtime (only possible by resetting
the mtime on purpose) is not seen. Symbolic links are followed to files, not into directories;
files that vanish while the tree is walked are skipped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path

from bridge.errors import StoreError
from bridge.sources.stores import StoredObject

__all__ = ["LocalStore", "local_etag"]

_MASK64 = (1 << 64) - 1


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


class LocalStore:
    """Objects are the files under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

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
        if start_rel and not (self.root / start_rel).resolve().is_relative_to(self.root.resolve()):
            raise StoreError(f"prefix {prefix!r} leaves the local store root {str(self.root)!r}")
        yield await asyncio.to_thread(self._walk, prefix)

    def _resolve(self, path: str) -> Path:
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise ValueError(f"path {path!r} leaves the store root {str(self.root)!r}")
        return target

    def _walk(self, prefix: str) -> Sequence[StoredObject]:
        # Start at the deepest directory the prefix names, then filter by the full prefix.
        # ~1 us per file besides its stat() (1,000,000 files: a few seconds of CPU per poll):
        # names are looked up once, the ETag is one %-format, no call per file but stat().
        start_rel = prefix.rpartition("/")[0]
        found: list[StoredObject] = []
        append = found.append
        fromtimestamp = datetime.fromtimestamp
        pending = [(str(self.root / start_rel) if start_rel else str(self.root), start_rel)]
        while pending:
            directory, rel = pending.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = list(listing)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise StoreError(f"cannot list {directory!r}: {exc}") from exc
            base = f"{rel}/" if rel else ""
            for entry in entries:
                path = base + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if path.startswith(prefix) or prefix.startswith(path + "/"):
                            pending.append((entry.path, path))
                    elif entry.is_file() and path.startswith(prefix):
                        st = entry.stat()
                        size = st.st_size
                        mtime_ns = st.st_mtime_ns
                        etag = (
                            "%016x%016x" % (mtime_ns, size)  # noqa: UP031 (the fastest here)
                            if mtime_ns >= 0
                            else local_etag(mtime_ns, size)
                        )
                        append(StoredObject(path, etag, size, fromtimestamp(st.st_mtime, UTC)))
                except FileNotFoundError:
                    continue
        found.sort(key=attrgetter("path"))  # in key order, as S3 lists: the poller merges
        return found


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
