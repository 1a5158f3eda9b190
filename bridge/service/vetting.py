"""Items that cannot be published, found before their batch goes out.

One item that cannot be published must not hold back the others. Before a batch is published,
each of its events is checked, and one that fails is *rejected*: left out of the batch, with
its state entry left out of the commit, so the rest is delivered and committed while the
rejected item keeps its committed state and comes back as a change at the next poll (where it
is tried again: fixed, deleted or still bad). Reasons, the ``reason`` label of
``koprs_bridge_items_rejected_total``:

* ``unencodable``: the event cannot be written at all (a key that is not valid Unicode text, a
  lone surrogate in a custom resource, an encoder error);
* ``invalid``: its ``data`` does not match the JSON Schema its ``dataschema`` names (a custom
  store listing an object with no ETag, a negative size, a date-time without a UTC offset);
* ``too_large``: the broker would refuse it for its size (:class:`~bridge.sinks.SizeLimitedSink`).

The checks of the three built-in schemas are written out here (a full JSON Schema validation
costs about three times the encoding of an event); any other ``dataschema`` is validated with
``jsonschema``. A test holds them to the schema files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

import jsonschema

from bridge.cloudevents import SCHEMA_BASE_URI, CloudEvent, EventEncoder
from bridge.events import ExternalEvent
from bridge.schemas import load_schema

__all__ = ["Rejections", "data_problem", "encode_checked", "vet"]

Rejections = dict[int, tuple[str, str]]
"""Rejected events of a batch by index: (reason, what is wrong)."""


def encode_checked(
    encoder: EventEncoder, events: Sequence[ExternalEvent[Any]], revision: int
) -> tuple[list[CloudEvent | None], Rejections]:
    """Encode and :func:`vet` a batch: the CloudEvents (None where rejected) and rejections."""
    rejected: Rejections = {}
    encoded: list[CloudEvent | None]
    try:
        encoded = list(encoder.encode_all(events, revision))
    except Exception:  # find the culprit(s): encode one by one
        encoded = []
        for index, event in enumerate(events):
            try:
                [one] = encoder.encode_all([event], revision)
            except Exception as exc:
                rejected[index] = ("unencodable", f"{type(exc).__name__}: {exc}")
                encoded.append(None)
            else:
                encoded.append(one)
    for index, cloud_event in enumerate(encoded):
        if cloud_event is None:
            continue
        checked = vet(cloud_event)
        if isinstance(checked, CloudEvent):
            encoded[index] = checked
        else:
            rejected[index] = checked
            encoded[index] = None
    return encoded, rejected


def vet(event: CloudEvent) -> CloudEvent | tuple[str, str]:
    """``event`` ready to publish (its data encoded once), or why it cannot be."""
    subject = event.subject
    if not subject.isascii():
        try:
            subject.encode("utf-8")
        except UnicodeEncodeError as exc:
            return "unencodable", f"its key is not valid Unicode text ({exc.reason})"
    if event.encoded_data is None:
        try:
            data = event.data_bytes()
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            return "unencodable", f"its data cannot be written as JSON ({exc})"
        event = dataclasses.replace(event, encoded_data=data)
    problem = data_problem(event.dataschema, event.data)
    if problem is not None:
        return "invalid", f"its data does not match {event.dataschema}: {problem}"
    return event


def data_problem(dataschema: str, data: Mapping[str, Any]) -> str | None:
    """What in ``data`` the schema ``dataschema`` refuses (None: it is valid)."""
    check = _CHECKS.get(dataschema)
    if check is not None:
        return check(data)
    try:
        validator = _validator(dataschema)
    except KeyError:
        return "no such schema"
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path)
    return f"{where or 'data'}: {error.message}"


@cache
def _validator(dataschema: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(dataschema))


_DATE_TIME = re.compile(
    r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)\Z", re.ASCII
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z", re.ASCII)
_OBJECT_FIELDS = frozenset({"path", "etag", "size", "last_modified"})
_HTTP_FIELDS = frozenset(
    {"url", "status", "etag", "last_modified", "content_type", "digest", "size", "body"}
)
_CUSTOM_FIELDS = frozenset({"key", "version", "value"})


def _fields(data: Mapping[str, Any], expected: frozenset[str]) -> str | None:
    if data.keys() == expected:
        return None
    missing, extra = sorted(expected - data.keys()), sorted(data.keys() - expected)
    return f"fields missing {missing}, unexpected {extra}"


def _size(value: object) -> str | None:
    if value is None or (type(value) is int and value >= 0):
        return None
    return f"size {value!r} is neither a non-negative integer nor null"


def _optional_text(data: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = data[name]
        if value is not None and type(value) is not str:
            return f"{name} {value!r} is neither a string nor null"
    return None


def _stored_object(data: Mapping[str, Any]) -> str | None:
    size, modified = data.get("size"), data.get("last_modified")
    if (  # the usual case, in one expression: what the encoder makes of a well-formed object
        type(data.get("path")) is str
        and type(data.get("etag")) is str
        and (size is None or (type(size) is int and size >= 0))
        and type(modified) is str
        and _DATE_TIME.match(modified)
        and data.keys() == _OBJECT_FIELDS
    ):
        return None
    if problem := _fields(data, _OBJECT_FIELDS):
        return problem
    for name in ("path", "etag"):
        if type(data[name]) is not str:
            return f"{name} {data[name]!r} is not a string"
    if problem := _size(data["size"]):
        return problem
    modified = data["last_modified"]
    if modified is not None and (type(modified) is not str or not _DATE_TIME.match(modified)):
        return f"last_modified {modified!r} is not an RFC 3339 date-time (with its UTC offset)"
    return None


def _http_resource(data: Mapping[str, Any]) -> str | None:
    if problem := _fields(data, _HTTP_FIELDS):
        return problem
    if type(data["url"]) is not str:
        return f"url {data['url']!r} is not a string"
    status = data["status"]
    if type(status) is not int or not 100 <= status <= 599:
        return f"status {status!r} is not an HTTP status"
    if problem := _optional_text(data, "etag", "last_modified", "content_type"):
        return problem
    digest = data["digest"]
    if type(digest) is not str or not _DIGEST.match(digest):
        return f"digest {digest!r} is not sha256:<64 hex digits>"
    if problem := _size(data["size"]):
        return problem
    body = data["body"]
    if body is None:
        return None
    if (
        type(body) is not dict
        or body.keys() != {"encoding", "data"}
        or body["encoding"] not in ("utf-8", "base64")
        or type(body["data"]) is not str
    ):
        return "body is neither null nor {encoding: utf-8|base64, data: string}"
    return None


def _custom_resource(data: Mapping[str, Any]) -> str | None:
    if problem := _fields(data, _CUSTOM_FIELDS):
        return problem
    for name in ("key", "version"):
        if type(data[name]) is not str:
            return f"{name} {data[name]!r} is not a string"
    return None


_CHECKS: dict[str, Callable[[Mapping[str, Any]], str | None]] = {
    f"{SCHEMA_BASE_URI}v1/stored-object.json": _stored_object,
    f"{SCHEMA_BASE_URI}v1/http-resource.json": _http_resource,
    f"{SCHEMA_BASE_URI}v1/custom-resource.json": _custom_resource,
}
