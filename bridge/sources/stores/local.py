"""``LocalStore``: a directory tree as an object store.

Paths are relative to the root with ``/`` separators, listed in key order. The ETag is
``<mtime_ns>-<size>`` in hex: listing never reads file contents, so a large tree stays cheap to
poll. A rewrite that keeps both the size and the nanosecond mtime (only possible by resetting
the mtime on purpose) is not seen. Symbolic links are followed to files, not into directories;
files that vanish while the tree is walked are skipped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path

from bridge.errors import StoreError
from bridge.sources.stores.base import StoredObject

__all__ = ["LocalStore"]


class LocalStore:
    """Objects are the files under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

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
        start_rel = prefix.rpartition("/")[0]
        found: list[StoredObject] = []
        pending = [(self.root / start_rel if start_rel else self.root, start_rel)]
        while pending:
            directory, rel = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise StoreError(f"cannot list {str(directory)!r}: {exc}") from exc
            for entry in entries:
                path = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if path.startswith(prefix) or prefix.startswith(path + "/"):
                            pending.append((Path(entry.path), path))
                    elif entry.is_file() and path.startswith(prefix):
                        st = entry.stat()
                        found.append(
                            StoredObject(
                                path,
                                f"{st.st_mtime_ns:x}-{st.st_size:x}",
                                st.st_size,
                                datetime.fromtimestamp(st.st_mtime, UTC),
                            )
                        )
                except FileNotFoundError:
                    continue
        found.sort(key=attrgetter("path"))  # in key order, as S3 lists: the poller merges
        return found


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
