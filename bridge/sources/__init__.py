"""Sources: things that can be polled for changes. No broker code lives here."""

from typing import TYPE_CHECKING, Any

from bridge.sources.base import Changeset, StatefulSource, StateMapSource
from bridge.sources.http import HttpPoller, HttpResource
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import LocalStore, MemoryStore, ObjectStore, StoredObject

if TYPE_CHECKING:
    from bridge.sources.stores.s3 import S3Store

__all__ = [
    "Changeset",
    "HttpPoller",
    "HttpResource",
    "LocalStore",
    "MemoryStore",
    "ObjectStore",
    "ObjectStorePoller",
    "S3Store",
    "StateMapSource",
    "StatefulSource",
    "StoredObject",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":  # the optional `s3` extra: see bridge.sources.stores
        from bridge.sources import stores

        return stores.S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
