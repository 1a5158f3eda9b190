"""Sources: things that can be polled for changes. No broker code lives here."""

from bridge.sources.base import Changeset, StatefulSource, StateMapSource
from bridge.sources.http import HttpPoller, HttpResource
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import LocalStore, MemoryStore, ObjectStore, S3Store, StoredObject

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
