"""Typed decoding: a broker message back into the ``Added``/``Modified``/``Removed`` the library
produces, validated against the JSON Schemas in ``schemas/``.

* :func:`decode_nats` — a JetStream message, binary (``ce-*`` headers) or structured mode;
* :func:`decode_redis_entry` — a Redis stream entry, binary (``ce-*`` fields) or structured;
* :func:`decode_cloudevent` — attributes plus data, whatever carried them.

Anything that is not a koprs CloudEvent this version understands raises a
:class:`~bridge.errors.DecodeError` (``UnknownEventTypeError`` for a well-formed event of a type
or version it does not know, so callers can skip those by policy); never another exception.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import jsonschema

from bridge.cloudevents import SCHEMA_BASE_URI, TYPE_PREFIX, header_value
from bridge.errors import DecodeError, UnknownEventTypeError
from bridge.events import Added, EventKind, ExternalEvent, Modified, Removed
from bridge.schemas import load_schema, schemas_by_id
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject
from bridge.subjects import decode_item_token

__all__ = [
    "CustomResource",
    "Envelope",
    "UnknownEventTypeError",
    "decode_cloudevent",
    "decode_nats",
    "decode_redis_entry",
    "decode_structured",
]

ENVELOPE_SCHEMA = f"{SCHEMA_BASE_URI}v1/cloudevent.json"
_KINDS: dict[str, type[ExternalEvent[Any]]] = {
    "added": Added,
    "modified": Modified,
    "removed": Removed,
}


@dataclass(frozen=True, slots=True)
class CustomResource:
    """The resource of an event from a user-written source."""

    key: str
    version: str
    value: Any


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded event: the typed change and the CloudEvent context it came with."""

    event: ExternalEvent[Any]
    id: str
    type: str
    source: str
    """The origin URI (the URL, ``s3://bucket/prefix``...)."""
    source_name: str | None
    """The bridge's name of the source (from the subject or stream key), when known."""
    subject: str
    """The item's key."""
    time: datetime
    dataschema: str
    traceparent: str | None = None

    @property
    def kind(self) -> EventKind:
        return self.event.kind

    @property
    def key(self) -> str:
        return self.subject


@cache
def _validator(uri: str) -> jsonschema.protocols.Validator:
    try:
        schema = load_schema(uri)
    except KeyError:
        raise UnknownEventTypeError(f"unknown dataschema {uri!r}") from None
    cls = jsonschema.validators.validator_for(schema)
    validator: jsonschema.protocols.Validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validator


def _check(uri: str, document: Any, what: str) -> None:
    error = jsonschema.exceptions.best_match(_validator(uri).iter_errors(document))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise DecodeError(f"{what} does not match {uri} at {where}: {error.message}")


def decode_cloudevent(
    attributes: Mapping[str, Any], data: Any, *, source_name: str | None = None
) -> Envelope:
    """Decode context attributes plus ``data`` (a mapping, or JSON bytes/str)."""
    if not isinstance(attributes, Mapping):
        raise DecodeError(
            f"CloudEvent attributes must be a mapping, not {type(attributes).__name__}"
        )
    event_type = attributes.get("type")
    if isinstance(event_type, str) and not _known_type(event_type):
        raise UnknownEventTypeError(f"unknown CloudEvent type {event_type!r}")
    dataschema = attributes.get("dataschema")
    if isinstance(dataschema, str) and dataschema not in schemas_by_id():
        raise UnknownEventTypeError(f"unknown dataschema {dataschema!r}")
    if isinstance(data, bytes | bytearray | str):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"CloudEvent data is not JSON: {exc}") from exc
    document = {**attributes, "data": data}
    _check(ENVELOPE_SCHEMA, document, "CloudEvent")
    schema = str(attributes["dataschema"])
    _check(schema, data, "CloudEvent data")
    kind = str(attributes["type"]).split(".")[-2]
    try:
        return Envelope(
            event=_KINDS[kind](_resource(schema, data)),
            id=str(attributes["id"]),
            type=str(attributes["type"]),
            source=str(attributes["source"]),
            source_name=source_name,
            subject=str(attributes["subject"]),
            time=datetime.fromisoformat(str(attributes["time"]).replace("Z", "+00:00")),
            dataschema=schema,
            traceparent=attributes.get("traceparent"),
        )
    except (ValueError, KeyError, TypeError) as exc:  # e.g. a date that is not RFC 3339
        raise DecodeError(f"CloudEvent {attributes.get('id')!r} is malformed: {exc}") from exc


def _known_type(event_type: str) -> bool:
    return any(event_type == f"{TYPE_PREFIX}.{kind}.v1" for kind in _KINDS)


def decode_structured(body: bytes | str, *, source_name: str | None = None) -> Envelope:
    """Decode a structured-mode event (one JSON document)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"structured CloudEvent is not JSON: {exc}") from exc
    if not isinstance(document, dict) or "data" not in document:
        raise DecodeError("structured CloudEvent must be a JSON object with a 'data' member")
    data = document.pop("data")
    return decode_cloudevent(document, data, source_name=source_name)


def decode_nats(
    subject: str,
    headers: Mapping[str, str] | None,
    body: bytes,
    *,
    subject_prefix: str = "koprs.external",
) -> Envelope:
    """Decode a JetStream message published by the bridge (either content mode)."""
    source_name = _source_from_subject(subject, subject_prefix)
    headers = headers or {}
    if "ce-id" not in headers and "ce-type" not in headers:
        return decode_structured(body, source_name=source_name)
    try:
        attributes = {k[3:]: header_value(v) for k, v in headers.items() if k.startswith("ce-")}
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"ce-* header is not valid percent-encoded UTF-8: {exc}") from exc
    content_type = headers.get("content-type") or headers.get("Content-Type")
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    return decode_cloudevent(attributes, body, source_name=source_name)


def decode_redis_entry(
    stream_key: str | bytes,
    fields: Mapping[Any, Any],
    *,
    stream_prefix: str = "koprs:external:",
) -> Envelope:
    """Decode an entry of ``koprs:external:<source>`` (either content mode)."""
    key = stream_key.decode() if isinstance(stream_key, bytes) else stream_key
    source_name = key[len(stream_prefix) :] if key.startswith(stream_prefix) else None
    try:
        text = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
    except UnicodeDecodeError as exc:
        raise DecodeError(f"Redis entry field name is not UTF-8: {exc}") from exc
    if "event" in text:
        return decode_structured(text["event"], source_name=source_name)
    try:
        attributes = {
            k[3:]: header_value(v.decode() if isinstance(v, bytes) else str(v))
            for k, v in text.items()
            if k.startswith("ce-")
        }
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"ce-* field is not valid percent-encoded UTF-8: {exc}") from exc
    if "data" not in text:
        raise DecodeError("Redis entry has neither an 'event' nor a 'data' field")
    content_type = text.get("content-type")
    if content_type is not None:
        attributes["datacontenttype"] = (
            content_type.decode("utf-8", "replace")
            if isinstance(content_type, bytes)
            else str(content_type)
        )
    return decode_cloudevent(attributes, text["data"], source_name=source_name)


def _source_from_subject(subject: str, prefix: str) -> str | None:
    if not subject.startswith(prefix + "."):
        return None
    rest = subject[len(prefix) + 1 :].split(".")
    return rest[0] if len(rest) == 2 else None


def item_key_from_subject(subject: str, prefix: str = "koprs.external") -> str | None:
    """The item key a subject encodes (None when shortened or not a bridge subject)."""
    if not subject.startswith(prefix + "."):
        return None
    parts = subject[len(prefix) + 1 :].split(".")
    return decode_item_token(parts[1]) if len(parts) == 2 else None


def _resource(schema: str, data: Mapping[str, Any]) -> Any:
    name = schema.rsplit("/", 1)[-1]
    if name == "http-resource.json":
        body = data["body"]
        raw = b""
        if body is not None:
            if body["encoding"] == "base64":
                try:
                    raw = base64.b64decode(body["data"], validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise DecodeError(f"HTTP body is not valid base64: {exc}") from exc
            else:
                raw = body["data"].encode("utf-8")
        return HttpResource(
            url=data["url"],
            status=data["status"],
            body=raw,
            etag=data["etag"],
            last_modified=data["last_modified"],
            content_type=data["content_type"],
            digest=data["digest"].removeprefix("sha256:"),
        )
    if name == "stored-object.json":
        modified = data["last_modified"]
        return StoredObject(
            path=data["path"],
            etag=data["etag"],
            size=data["size"],
            last_modified=datetime.fromisoformat(modified) if modified else None,
        )
    return CustomResource(key=data["key"], version=data["version"], value=data["value"])
