"""``MemoryStore``: an object store in a dict, for tests and examples."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from itertools import count

from bridge.sources.stores.base import StoredObject

__all__ = ["MemoryStore"]

_instances = count(1)


class MemoryStore:
    """Objects in memory. ETags are the MD5 of the content, as S3 computes them."""

    def __init__(self, name: str | None = None, *, page_size: int = 1000) -> None:
        self.uri = f"memory://{name or next(_instances)}"
        self.page_size = page_size
        self._objects: dict[str, tuple[bytes, StoredObject]] = {}

    async def put(self, path: str, data: bytes) -> StoredObject:
        obj = StoredObject(
            path, hashlib.md5(data, usedforsecurity=False).hexdigest(), len(data), datetime.now(UTC)
        )
        self._objects[path] = (bytes(data), obj)
        return obj

    async def delete(self, path: str) -> None:
        """Delete ``path``; deleting a missing path is not an error (as in S3)."""
        self._objects.pop(path, None)

    async def get(self, path: str) -> bytes:
        return self._objects[path][0]

    async def list(self, prefix: str = "") -> AsyncIterator[Sequence[StoredObject]]:
        items = sorted(self._objects.items())
        objects = [obj for path, (_, obj) in items if path.startswith(prefix)]
        for start in range(0, len(objects), self.page_size):
            yield objects[start : start + self.page_size]
