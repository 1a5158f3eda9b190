"""Encode events as CloudEvents 1.0 (``dev.koprs.external.<kind>.v1``).

The ``id`` is deterministic: the first 32 hex digits of the SHA-256 of the source name, the
item key, the kind, the item's version token (ETag, body digest) and the source's *revision*
(the count of changesets the bridge committed for that source, from a random base chosen when
the source's state was created). Re-deriving a change after a
crash or a failed publish gives the same id, so the broker drops the copy; the revision keeps
ids distinct when an item returns to an earlier version later (a file recreated with the same
content is a new ``Added``).

``data`` is documented by the JSON Schemas in ``schemas/v1/`` and ``dataschema`` names the one
that applies. HTTP bodies up to ``max_inline_body_bytes`` are inlined (UTF-8 text as is,
anything else base64); larger bodies are described by their digest and size only.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from bridge.events import EventKind, ExternalEvent
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject

__all__ = [
    "DATA_CONTENT_TYPE",
    "SCHEMA_BASE_URI",
    "SPEC_VERSION",
    "CloudEvent",
    "EventEncoder",
    "event_id",
    "event_type",
    "header_value",
]

SPEC_VERSION = "1.0"
TYPE_PREFIX = "dev.koprs.external"
DATA_CONTENT_TYPE = "application/json"
SCHEMA_BASE_URI = "https://koprs.dev/schemas/bridge/"
"""``$id`` prefix of the files in ``schemas/``: ``<base>v1/http-resource.json`` etc."""
DEFAULT_MAX_INLINE_BODY_BYTES = 64 * 1024
_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


def event_type(kind: EventKind, version: int = 1) -> str:
    """``dev.koprs.external.added.v1`` and so on."""
    return f"{TYPE_PREFIX}.{kind}.v{version}"


def event_id(source_name: str, key: str, kind: str, version: str, revision: int) -> str:
    """The deterministic CloudEvent id (see the module docstring)."""
    material = "\x1f".join((source_name, key, kind, version, str(revision)))
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """A CloudEvents 1.0 event with JSON data, ready for either content mode."""

    id: str
    source: str
    type: str
    subject: str
    time: str
    dataschema: str
    data: Mapping[str, Any]
    datacontenttype: str = DATA_CONTENT_TYPE
    traceparent: str | None = None

    def attributes(self) -> dict[str, str]:
        """The context attributes (everything but ``data``)."""
        attrs = {
            "specversion": SPEC_VERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": self.time,
            "datacontenttype": self.datacontenttype,
            "dataschema": self.dataschema,
        }
        if self.traceparent:
            attrs["traceparent"] = self.traceparent
        return attrs

    def data_bytes(self) -> bytes:
        return _dumps(self.data)

    def to_structured(self) -> bytes:
        """Structured content mode: the whole event as one JSON document."""
        return _dumps({**self.attributes(), "data": self.data})

    def to_binary(self) -> tuple[dict[str, str], bytes]:
        """Binary content mode: ``ce-*`` headers plus ``Content-Type``, and the data as body.

        Header values are percent-encoded as the CloudEvents HTTP binding prescribes (every
        character outside printable ASCII, and space, ``"`` and ``%``), so keys with blanks,
        line breaks or non-ASCII text survive header transports; :func:`header_value` decodes.
        """
        headers = {
            f"ce-{k}": quote(v, safe=_HEADER_SAFE) if _NEEDS_QUOTING.search(v) else v
            for k, v in self.attributes().items()
            if k != "datacontenttype"
        }
        headers["content-type"] = self.datacontenttype
        return headers, self.data_bytes()


_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["%]')


def header_value(raw: str) -> str:
    """Decode a ``ce-*`` header value written by :meth:`CloudEvent.to_binary`."""
    return unquote(raw, errors="strict")


class EventEncoder:
    """Turns one source's events into CloudEvents."""

    def __init__(
        self,
        source_name: str,
        source_uri: str,
        *,
        max_inline_body_bytes: int = DEFAULT_MAX_INLINE_BODY_BYTES,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.source_name = source_name
        self.source_uri = source_uri
        self.max_inline_body_bytes = max_inline_body_bytes
        self._now = now or (lambda: datetime.now(UTC))

    def encode(self, event: ExternalEvent[Any], revision: int) -> CloudEvent:
        """Encode ``event``, part of the changeset that makes the source's ``revision``."""
        resource = event.resource
        if isinstance(resource, HttpResource):
            key, version, schema = resource.url, resource.version, "http-resource"
            data = self._http_data(resource)
        elif isinstance(resource, StoredObject):
            key, version, schema = resource.path, resource.etag, "stored-object"
            data = _object_data(resource)
        else:
            value = _jsonable(resource)
            key = str(getattr(resource, "key", self.source_name))
            version = (
                getattr(resource, "version", None)
                or "sha256:" + hashlib.sha256(_dumps(value)).hexdigest()
            )
            version, schema = str(version), "custom-resource"
            data = {"key": key, "version": version, "value": value}
        return CloudEvent(
            id=event_id(self.source_name, key, event.kind, version, revision),
            source=self.source_uri,
            type=event_type(event.kind),
            subject=key,
            time=self._now()
            .astimezone(UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            dataschema=f"{SCHEMA_BASE_URI}v1/{schema}.json",
            data=data,
        )

    def _http_data(self, r: HttpResource) -> dict[str, Any]:
        body_known = bool(r.body) or r.digest == _EMPTY_DIGEST
        body: dict[str, str] | None = None
        if body_known and len(r.body) <= self.max_inline_body_bytes:
            try:
                body = {"encoding": "utf-8", "data": r.body.decode("utf-8")}
            except UnicodeDecodeError:
                body = {"encoding": "base64", "data": base64.b64encode(r.body).decode("ascii")}
        return {
            "url": r.url,
            "status": r.status,
            "etag": r.etag,
            "last_modified": r.last_modified,
            "content_type": r.content_type,
            "digest": r.version,
            "size": len(r.body) if body_known else None,
            "body": body,
        }


def _object_data(o: StoredObject) -> dict[str, Any]:
    return {
        "path": o.path,
        "etag": o.etag,
        "size": o.size,
        "last_modified": o.last_modified.isoformat() if o.last_modified else None,
    }


def _jsonable(value: Any) -> Any:
    """A JSON form of a custom source's resource (dataclasses, pydantic models, mappings...)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


try:  # optional: only makes encoding faster (see _dumps)
    _orjson: Any = importlib.import_module("orjson")
except ImportError:
    _orjson = None
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True)
_I64_MIN, _U64_END = -(1 << 63), 1 << 64


def _plain(value: Any) -> bool:
    """Whether ``value`` is JSON made only of the types orjson writes byte for byte like ``_JSON``
    (exact str, int within 64 bits, bool, None, lists, dicts with str keys; no floats)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(_I64_MIN <= value < _U64_END)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if kind is list:
        return all(_plain(v) for v in value)
    return False


def _dumps(value: Any) -> bytes:
    """Compact JSON with sorted keys, non-ASCII as UTF-8: the bytes of every event and digest.

    With the optional ``orjson`` installed, plain values (see ``_plain``) are written by it, an
    order of magnitude faster on large strings and identical byte for byte; anything else (floats
    above all, whose text differs between the two) goes through the standard library.
    """
    if _orjson is not None and _plain(value):
        try:
            fast: bytes = _orjson.dumps(value, option=_orjson.OPT_SORT_KEYS)
            return fast
        except _orjson.JSONEncodeError:
            pass  # e.g. a lone surrogate: let the standard library raise its own error
    return _JSON.encode(value).encode()
