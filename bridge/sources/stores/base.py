"""What every object store lists, and what the poller needs of a store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, overload, runtime_checkable

from bridge.events import EventData
from bridge.sources.packed import DIGEST_SIZE as SLOT_SIZE

__all__ = ["ObjectStore", "PackedPage", "StoredObject"]


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object of a listing. In ``Removed`` events ``size`` and ``last_modified`` are None:
    the poller only remembers each path's ETag, which keeps large buckets cheap to track."""

    path: str
    etag: str
    size: int | None = None
    last_modified: datetime | None = None

    @property
    def key(self) -> str:
        return self.path

    @property
    def version(self) -> str:
        return self.etag

    def event_data(self, max_inline_body_bytes: int) -> EventData:
        """The ``stored-object`` data of its events (no body: objects are described)."""
        data = {
            "path": self.path,
            "etag": self.etag,
            "size": self.size,
            "last_modified": self.last_modified.isoformat() if self.last_modified else None,
        }
        return EventData(self.path, self.etag, "stored-object", data, plain=True)


class PackedPage(Sequence[StoredObject]):
    """A page of a listing whose ETags are all 32 lowercase hex digits, held as columns: the
    paths (``paths``) and each ETag's 16 bytes (``digests``, in the same order).

    The poller diffs such a page against its packed state by comparing bytes, and builds a
    :class:`StoredObject` (:meth:`object`) only for the entries that have an event, so an
    unchanged listing costs no object per entry. Indexing or iterating builds the objects
    (as a ``Sequence[StoredObject]`` does). Subclasses carry what else their objects hold
    (:meth:`object`); this one builds objects with a path and an ETag only.
    """

    __slots__ = ("digests", "paths")

    def __init__(self, paths: list[str], digests: bytes) -> None:
        if len(digests) != SLOT_SIZE * len(paths):
            raise ValueError(
                f"{len(paths)} paths need {SLOT_SIZE * len(paths)} bytes of digests, "
                f"not {len(digests)}"
            )
        self.paths = paths
        self.digests = digests

    def etag(self, index: int) -> str:
        """The ETag of entry ``index``: its 16 bytes in hex."""
        start = index * SLOT_SIZE
        return self.digests[start : start + SLOT_SIZE].hex()

    def object(self, index: int) -> StoredObject:
        """The object of entry ``index`` (0 <= index < len)."""
        return StoredObject(self.paths[index], self.etag(index))

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> StoredObject: ...

    @overload
    def __getitem__(self, index: slice) -> list[StoredObject]: ...

    def __getitem__(self, index: int | slice) -> StoredObject | list[StoredObject]:
        if isinstance(index, slice):
            return [self.object(i) for i in range(*index.indices(len(self.paths)))]
        if index < 0:
            index += len(self.paths)
        if not 0 <= index < len(self.paths):
            raise IndexError("page index out of range")
        return self.object(index)

    def __iter__(self) -> Iterator[StoredObject]:
        return map(self.object, range(len(self.paths)))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self.paths)} entries>"


@runtime_checkable
class ObjectStore(Protocol):
    """What ``ObjectStorePoller`` needs of a store."""

    @property
    def uri(self) -> str:
        """Where the store is, as a URI (``s3://bucket``, ``file:///srv/data``, ``memory://x``)."""
        ...

    def list(self, prefix: str = "") -> AsyncIterator[Sequence[StoredObject]]:
        """Pages of the objects whose path starts with ``prefix`` (lists, or
        :class:`PackedPage` pages where every ETag is 32 lowercase hex digits)."""
        ...
