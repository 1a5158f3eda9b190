"""Object stores the ``ObjectStorePoller`` can list: S3-compatible, a local folder, memory.

A store only has to list: ``list(prefix)`` yields pages of :class:`StoredObject`, in any
order, each path once; in key order (code-point order, as S3 lists, and as the three stores
here do) the poller diffs it fastest, merging it with its sorted state. ``S3Store`` needs the
``s3`` extra (``pip install 'koprs-bridge[s3]'``); without it, creating one raises
:class:`~bridge.errors.MissingExtraError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

__all__ = ["LocalStore", "MemoryStore", "ObjectStore", "S3Store", "StoredObject"]


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


from bridge.sources.stores.local import LocalStore  # noqa: E402
from bridge.sources.stores.memory import MemoryStore  # noqa: E402

if TYPE_CHECKING:
    from bridge.sources.stores.s3 import S3Store
else:

    def __getattr__(name: str) -> Any:
        if name == "S3Store":  # imported lazily: aioboto3 is the optional `s3` extra
            from bridge.errors import MissingExtraError

            store: type[Any]
            try:
                from bridge.sources.stores.s3 import S3Store as store
            except MissingExtraError as exc:  # importable; creating one raises `exc`
                from bridge.extras import placeholder

                store = placeholder("S3Store", "S3Store", exc)
            globals()["S3Store"] = store  # one class, whatever the path it is imported by
            return store
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
