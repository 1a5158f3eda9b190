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
    DecodeError,
    FencedError,
    HttpStatusError,
    PublishError,
    SourceError,
    SourceUnavailableError,
    StateError,
    StoreError,
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
    "DecodeError",
    "ExternalEvent",
    "ExternalSource",
    "FencedError",
    "HttpPoller",
    "HttpResource",
    "HttpStatusError",
    "LocalStore",
    "MemoryStore",
    "Modified",
    "ObjectStore",
    "ObjectStorePoller",
    "PublishError",
    "Removed",
    "Resource",
    "S3Store",
    "SourceError",
    "SourceUnavailableError",
    "StateError",
    "StatefulSource",
    "StoreError",
    "StoredObject",
    "WatchConfig",
    "__version__",
    "watch_external",
    "watch_external_with_config",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":  # aioboto3 is the optional `s3` extra: import it only when asked
        from bridge.sources.stores.s3 import S3Store

        return S3Store
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
