"""The event model: what changed at a source, as ``Added``, ``Modified`` or ``Removed``.

Events are frozen dataclasses with one field, ``resource``, so consumers can ``match``::

    match event:
        case Added(resource) | Modified(resource):
            apply(resource)
        case Removed(resource):
            forget(resource)

A resource can describe what its events carry (:class:`DescribedResource`: the built-in
``HttpResource`` and ``StoredObject`` do), so the CloudEvents encoder needs to know no source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    Any,
    ClassVar,
    Generic,
    Literal,
    NamedTuple,
    Protocol,
    TypeVar,
    runtime_checkable,
)

__all__ = [
    "Added",
    "DescribedResource",
    "EventData",
    "EventKind",
    "ExternalEvent",
    "Modified",
    "Removed",
    "Resource",
]

EventKind = Literal["added", "modified", "removed"]
R_co = TypeVar("R_co", covariant=True)


@runtime_checkable
class Resource(Protocol):
    """What the bridge needs of a resource to publish it: a stable key and a version token.

    ``key`` names the item within its source (an object path, a URL); ``version`` changes
    whenever the item's content changes (an ETag, a body digest). Both feed the deterministic
    event id. Resources of custom sources that lack them are keyed by the source name and
    versioned by a digest of their JSON form.
    """

    @property
    def key(self) -> str: ...

    @property
    def version(self) -> str: ...


class EventData(NamedTuple):
    """What the events of one resource carry, as the resource describes it (a named tuple:
    built for every event)."""

    key: str
    """The item's key: the event's ``subject``, part of its id."""
    version: str
    """The item's version token, part of the event id."""
    schema: str
    """The JSON Schema of ``data``: ``schemas/v1/<schema>.json`` (``http-resource``...)."""
    data: dict[str, Any]
    """The event's ``data``."""
    plain: bool = False
    """``data`` holds only str, int (64 bit), bool, None, lists and dicts with str keys (no
    float), so a fast JSON encoder may write it without checking."""


@runtime_checkable
class DescribedResource(Protocol):
    """A resource that says what its events carry."""

    def event_data(self, max_inline_body_bytes: int) -> EventData:
        """Key, version, schema and ``data``; bodies above ``max_inline_body_bytes`` are
        described (digest, size) rather than inlined."""
        ...


@dataclass(frozen=True, slots=True)
class ExternalEvent(Generic[R_co]):
    """Base class of the three kinds of change."""

    resource: R_co
    kind: ClassVar[EventKind]


@dataclass(frozen=True, slots=True)
class Added(ExternalEvent[R_co]):
    """The item appeared (or was seen for the first time)."""

    kind: ClassVar[EventKind] = "added"


@dataclass(frozen=True, slots=True)
class Modified(ExternalEvent[R_co]):
    """The item's content changed; ``resource`` is the new state."""

    kind: ClassVar[EventKind] = "modified"


@dataclass(frozen=True, slots=True)
class Removed(ExternalEvent[R_co]):
    """The item disappeared; ``resource`` is its last known state."""

    kind: ClassVar[EventKind] = "removed"
