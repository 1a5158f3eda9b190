"""The public API is pinned: ``bridge.__all__``, ``bridge.consumer.__all__`` and
``bridge.errors.__all__`` change only with this file, every name resolves, and every exception
of the tree drawn in ``bridge.errors``' docstring is exported, with the bases drawn there."""

from __future__ import annotations

import re

import bridge
import bridge.consumer
import bridge.errors

BRIDGE = [
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

CONSUMER = [
    "CustomResource",
    "Delivery",
    "Envelope",
    "EventHandler",
    "FunctionHandler",
    "NatsWatch",
    "NatsWatchConfig",
    "RedisWatch",
    "RedisWatchConfig",
    "Reflector",
    "Synced",
    "TerminateReason",
    "UnknownEventTypeError",
    "Watch",
    "WatchItem",
    "decode_cloudevent",
    "decode_nats",
    "decode_redis_entry",
    "decode_structured",
    "event_handler",
    "run_handler",
    "watch_nats",
    "watch_redis",
]

_TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+Error)(?: \(also (?P<also>\w+)\))?")


def _tree() -> dict[str, tuple[str | None, str | None]]:
    """name -> (parent in the drawn tree, the "also" base), from bridge.errors' docstring."""
    doc = bridge.errors.__doc__ or ""
    block = doc.split("::", 1)[1].split("\n\n", 2)[1]
    tree: dict[str, tuple[str | None, str | None]] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        match = _TREE_LINE.match(line.strip("\n")[4:])  # the block is indented by 4
        assert match, line
        depth = len(match["indent"])
        while stack and stack[-1][0] >= depth:
            stack.pop()
        tree[match["name"]] = (stack[-1][1] if stack else None, match["also"])
        stack.append((depth, match["name"]))
    return tree


def test_bridge_all_is_pinned_sorted_and_resolves() -> None:
    assert bridge.__all__ == BRIDGE
    assert sorted(BRIDGE) == BRIDGE
    for name in BRIDGE:
        assert getattr(bridge, name) is not None, name


def test_consumer_all_is_pinned_sorted_and_resolves() -> None:
    assert bridge.consumer.__all__ == CONSUMER
    assert sorted(CONSUMER) == CONSUMER
    for name in CONSUMER:
        assert getattr(bridge.consumer, name) is not None, name


def test_star_imports_give_exactly_all() -> None:
    for module in (bridge, bridge.consumer, bridge.errors):
        names: dict[str, object] = {}
        exec(f"from {module.__name__} import *", names)
        assert set(names) - {"__builtins__"} == set(module.__all__), module.__name__


def test_the_drawn_exception_tree_is_the_exported_one() -> None:
    tree = _tree()
    assert len(tree) >= 15  # the parse found the tree
    assert bridge.errors.__all__ == sorted(tree)
    assert set(tree) <= set(BRIDGE)
    defined = {
        name
        for name, value in vars(bridge.errors).items()
        if isinstance(value, type) and issubclass(value, bridge.errors.BridgeError)
    }
    assert defined == set(tree)
    for name, (parent, also) in tree.items():
        cls = getattr(bridge.errors, name)
        assert cls is getattr(bridge, name)
        assert cls.__module__ == "bridge.errors"
        bases = [b.__name__ for b in cls.__bases__]
        assert bases == [parent or "Exception", *([also] if also else [])], name


def test_exceptions_defined_elsewhere_are_the_same_classes() -> None:
    from bridge.consumer.decoding import UnknownEventTypeError
    from bridge.sources.http import RedirectError

    assert UnknownEventTypeError is bridge.UnknownEventTypeError
    assert bridge.consumer.UnknownEventTypeError is bridge.UnknownEventTypeError
    assert RedirectError is bridge.RedirectError
