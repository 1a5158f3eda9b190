"""koprs-bridge: watch external sources and publish their changes as versioned CloudEvents.

The library layer (the Python form of the Rust crate ``koprs-external``)::

    from bridge import HttpPoller, watch_external, Added, Modified, Removed

    async for event in watch_external(HttpPoller("https://example.com/config.json"), 30):
        match event:
            case Added(resource) | Modified(resource): ...
            case Removed(resource): ...

Everything public is importable from here; ``__all__`` is the public API (a test pins it).

Layout, imports pointing one way (``tests/test_import_graph.py``): foundations (``events``,
``errors``, ``aio``, ``tls``, ``jsonable``, ``secrets``) → ``sources/`` → ``cloudevents`` →
``sinks/``, with ``state/``, ``ha/`` and ``connections`` beside them; ``service/``
(``factories`` builds, ``runner`` supervises) and ``telemetry/``; ``consumer/``, ``tail`` and
``cli`` on top.
"""

from typing import TYPE_CHECKING, Any

from bridge.errors import (
    BodyTooLargeError,
    BridgeError,
    ConfigError,
    ConnectError,
    DecodeError,
    FencedError,
    HttpStatusError,
    MissingExtraError,
    PublishError,
    RedirectError,
    SourceError,
    SourceUnavailableError,
    StateError,
    StoreError,
    UnknownEventTypeError,
)
from bridge.events import Added, ExternalEvent, Modified, Removed, Resource
from bridge.sources import (
    Changeset,
    HttpPoller,
    HttpResource,
    LocalStore,
    MemoryStore,
    ObjectStore,
    ObjectStorePoller,
    StatefulSource,
    StoredObject,
)
from bridge.watching import ExternalSource, WatchConfig, watch_external, watch_external_with_config

if TYPE_CHECKING:
    from bridge.sources.stores.s3 import S3Store

__version__ = "0.1.0"

__all__ = [
    "Added",
    "BodyTooLargeError",
    "BridgeError",
    "Changeset",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "ExternalEvent",
    "ExternalSource",
    "FencedError",
    "HttpPoller",
    "HttpResource",
    "HttpStatusError",
    "LocalStore",
    "MemoryStore",
    "MissingExtraError",
    "Modified",
    "ObjectStore",
    "ObjectStorePoller",
    "PublishError",
    "RedirectError",
    "Removed",
    "Resource",
    "S3Store",
    "SourceError",
    "SourceUnavailableError",
    "StateError",
    "StatefulSource",
    "StoreError",
    "StoredObject",
    "UnknownEventTypeError",
    "WatchConfig",
    "__version__",
    "watch_external",
    "watch_external_with_config",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":  # the optional `s3` extra: see bridge.sources.stores
        from bridge.sources import stores

        return stores.S3Store
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
