"""Object stores the ``ObjectStorePoller`` can list: S3-compatible, a local folder, memory.

A store only has to list: ``list(prefix)`` yields pages of :class:`StoredObject`, in any
order, each path once; in key order (code-point order, as S3 lists, and as the three stores
here do) the poller diffs it fastest, merging it with its sorted state. ``S3Store`` needs the
``s3`` extra (``pip install 'koprs-bridge[s3]'``); without it, creating one raises
:class:`~bridge.errors.MissingExtraError`.
The base types are in :mod:`bridge.sources.stores.base`, which the stores import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge.sources.stores.base import ObjectStore, StoredObject
from bridge.sources.stores.local import LocalStore
from bridge.sources.stores.memory import MemoryStore

__all__ = ["LocalStore", "MemoryStore", "ObjectStore", "S3Store", "StoredObject"]

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
