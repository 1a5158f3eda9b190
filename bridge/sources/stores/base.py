"""What every object store lists, and what the poller needs of a store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from bridge.events import EventData

__all__ = ["ObjectStore", "StoredObject"]


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


@runtime_checkable
class ObjectStore(Protocol):
    """What ``ObjectStorePoller`` needs of a store."""

    @property
    def uri(self) -> str:
        """Where the store is, as a URI (``s3://bucket``, ``file:///srv/data``, ``memory://x``)."""
        ...

    def list(self, prefix: str = "") -> AsyncIterator[Sequence[StoredObject]]:
        """Pages of the objects whose path starts with ``prefix``."""
        ...
