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

Beside the CloudEvent (not part of it: transport headers, like ``Nats-Msg-Id``), every message
carries what rebuilding a source's state from the broker needs (:mod:`bridge.state.recovery`),
in both content modes: ``koprs-kind`` (``added``, ``modified``, ``removed``), ``koprs-version``
(the item's version token, percent-encoded like the ``ce-*`` headers) and ``koprs-revision``
(the revision its id derives from). :func:`state_headers` builds them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import quote, unquote

from bridge.events import EventData, EventKind, ExternalEvent
from bridge.jsonable import jsonable, orjson

__all__ = [
    "DATA_CONTENT_TYPE",
    "KIND_HEADER",
    "REVISION_HEADER",
    "SCHEMA_BASE_URI",
    "SPEC_VERSION",
    "VERSION_HEADER",
    "CloudEvent",
    "ContentMode",
    "EventEncoder",
    "event_id",
    "event_type",
    "header_value",
    "state_headers",
]

ContentMode = Literal["binary", "structured"]
"""How an event goes on the wire: ``binary`` (``ce-*`` headers, the data as the body) or
``structured`` (the whole event as one JSON document)."""
SPEC_VERSION = "1.0"
TYPE_PREFIX = "dev.koprs.external"
DATA_CONTENT_TYPE = "application/json"
SCHEMA_BASE_URI = "https://koprs.dev/schemas/bridge/"
"""``$id`` prefix of the files in ``schemas/``: ``<base>v1/http-resource.json`` etc."""
DEFAULT_MAX_INLINE_BODY_BYTES = 64 * 1024


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
    encoded_data: bytes | None = field(default=None, repr=False, compare=False)
    """``data`` already encoded as :meth:`data_bytes` would (set by the encoder, which knows
    its data is plain JSON), so publishing does not encode it again."""
    version: str | None = field(default=None, compare=False)
    """The item's version token (part of the id; sent as ``koprs-version``)."""
    revision: int | None = field(default=None, compare=False)
    """The revision the id derives from (sent as ``koprs-revision``)."""

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
        encoded = self.encoded_data
        return encoded if encoded is not None else _dumps(self.data)

    def to_structured(self) -> bytes:
        """Structured content mode: the whole event as one JSON document (sorted keys)."""
        # "data" sorts before every attribute name: splice the encoded data in front of them.
        return b'{"data":' + self.data_bytes() + b"," + _dumps(self.attributes())[1:]

    def to_binary(self) -> tuple[dict[str, str], bytes]:
        """Binary content mode: ``ce-*`` headers plus ``Content-Type``, and the data as body.

        Header values are percent-encoded as the CloudEvents HTTP binding prescribes (every
        character outside printable ASCII, and space, ``"`` and ``%``), so keys with blanks,
        line breaks or non-ASCII text survive header transports; :func:`header_value` decodes.
        """
        source, type_, dataschema = _fixed_headers(self.source, self.type, self.dataschema)
        headers = {
            "ce-specversion": SPEC_VERSION,
            "ce-id": _header(self.id),
            "ce-source": source,
            "ce-type": type_,
            "ce-subject": _header(self.subject),
            "ce-time": _header(self.time),
            "ce-dataschema": dataschema,
        }
        if self.traceparent:
            headers["ce-traceparent"] = _header(self.traceparent)
        headers["content-type"] = self.datacontenttype
        return headers, self.data_bytes()


@lru_cache(maxsize=256)
def _fixed_headers(source: str, type_: str, dataschema: str) -> tuple[str, str, str]:
    """The header values that are the same for every event of a source and kind, encoded."""
    return _header(source), _header(type_), _header(dataschema)


def _header(value: str) -> str:
    return quote(value, safe=_HEADER_SAFE) if _NEEDS_QUOTING.search(value) else value


_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["%]')


KIND_HEADER = "koprs-kind"
VERSION_HEADER = "koprs-version"
REVISION_HEADER = "koprs-revision"


def state_headers(event: CloudEvent) -> dict[str, str]:
    """The ``koprs-*`` headers of ``event`` (none for an event built without a revision)."""
    if event.revision is None or event.version is None:
        return {}
    return {
        KIND_HEADER: event.type[len(TYPE_PREFIX) + 1 :].partition(".")[0],
        VERSION_HEADER: _header(event.version),
        REVISION_HEADER: str(event.revision),
    }


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
        self.traceparent: str | None = None
        """W3C trace context put on the events encoded from now on (the poll that found them,
        set by the delivery loop when tracing is on); not part of the id."""

    def encode_all(self, events: Iterable[ExternalEvent[Any]], revision: int) -> list[CloudEvent]:
        """Encode a batch: like :meth:`encode`, with one ``time`` for all (found together)."""
        time = self._time()
        return [self.encode(event, revision, time=time) for event in events]

    def _time(self) -> str:
        return self._now().astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")

    def encode(
        self, event: ExternalEvent[Any], revision: int, *, time: str | None = None
    ) -> CloudEvent:
        """Encode ``event``, part of the changeset that makes the source's ``revision``."""
        resource = event.resource
        encoded: bytes | None = None
        describe = getattr(resource, "event_data", None)
        if callable(describe):  # a DescribedResource: HttpResource, StoredObject...
            described: EventData = describe(self.max_inline_body_bytes)
            key, version, schema, data, plain = described
            if plain:
                encoded = _plain_dumps(data)
        else:
            value = jsonable(resource)
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
            time=time or self._time(),
            dataschema=f"{SCHEMA_BASE_URI}v1/{schema}.json",
            data=data,
            encoded_data=encoded,
            traceparent=self.traceparent,
            version=version,
            revision=revision,
        )


_orjson: Any = orjson  # optional: only makes encoding faster (see _dumps)
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


def _plain_dumps(value: dict[str, Any]) -> bytes | None:
    """``_dumps`` of data the encoder built itself (plain by construction: strings, ints of a
    size, None), without checking; None without orjson or when it refuses (a lone surrogate)."""
    if _orjson is None:
        return None
    try:
        fast: bytes = _orjson.dumps(value, option=_orjson.OPT_SORT_KEYS)
    except _orjson.JSONEncodeError:
        return None
    return fast


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
