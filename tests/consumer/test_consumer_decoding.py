"""Typed decoding of broker messages: round trips, and arbitrary input never crashes."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import Added, HttpResource, Modified, Removed, StoredObject
from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.consumer import (
    CustomResource,
    UnknownEventTypeError,
    decode_nats,
    decode_redis_entry,
    decode_structured,
)
from bridge.errors import DecodeError
from bridge.events import ExternalEvent
from bridge.subjects import nats_subject

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
ENCODER = EventEncoder("src", "s3://bucket/p", max_inline_body_bytes=16, now=lambda: NOW)

keys = st.text(min_size=0, max_size=40)
etags = st.text(alphabet="0123456789abcdef", min_size=1, max_size=32)
objects = st.builds(
    StoredObject,
    path=keys,
    etag=etags,
    size=st.one_of(st.none(), st.integers(0, 2**40)),
    last_modified=st.one_of(st.none(), st.just(NOW)),
)
bodies = st.one_of(st.binary(max_size=32), st.text(max_size=20).map(str.encode))
http = st.builds(
    HttpResource,
    url=st.just("https://example.com/a?b=c"),
    status=st.sampled_from([200, 203, 404]),
    body=bodies,
    etag=st.one_of(st.none(), st.just('W/"x"')),
    last_modified=st.none(),
    content_type=st.one_of(st.none(), st.just("application/json")),
)
kinds = st.sampled_from([Added, Modified, Removed])


def transports(event: CloudEvent) -> list[tuple[str, Any]]:
    headers, body = event.to_binary()
    structured = event.to_structured()
    subject = nats_subject("src", event.subject)
    binary_fields = {**{k.encode(): v.encode() for k, v in headers.items()}, b"data": body}
    return [
        ("nats-binary", decode_nats(subject, headers, body)),
        (
            "nats-structured",
            decode_nats(subject, {"content-type": "application/cloudevents+json"}, structured),
        ),
        ("redis-binary", decode_redis_entry("koprs:external:src", binary_fields)),
        ("redis-structured", decode_redis_entry(b"koprs:external:src", {b"event": structured})),
    ]


@settings(max_examples=60, deadline=None)
@given(kind=kinds, resource=objects)
def test_stored_objects_round_trip_in_every_transport(
    kind: type[ExternalEvent[Any]], resource: StoredObject
) -> None:
    event = ENCODER.encode(kind(resource), 7)
    for name, envelope in transports(event):
        assert envelope.event == kind(resource), name
        assert (envelope.id, envelope.subject, envelope.source_name) == (
            event.id,
            resource.path,
            "src",
        )
        assert envelope.time == NOW


@settings(max_examples=60, deadline=None)
@given(kind=kinds, resource=http)
def test_http_resources_round_trip_with_inlined_bodies(
    kind: type[ExternalEvent[Any]], resource: HttpResource
) -> None:
    event = ENCODER.encode(kind(resource), 1)
    for name, envelope in transports(event):
        decoded = envelope.event.resource
        assert isinstance(decoded, HttpResource), name
        assert decoded.digest == resource.digest
        assert (decoded.url, decoded.status, decoded.etag) == (
            resource.url,
            resource.status,
            resource.etag,
        )
        # Bodies up to the inline cap come back exactly; larger ones only by digest.
        assert decoded.body == (resource.body if len(resource.body) <= 16 else b"")


def test_custom_resources_decode_to_custom_resource() -> None:
    event = ENCODER.encode(Added({"tag": "v1", "n": 3}), 1)
    envelope = decode_structured(event.to_structured())
    assert isinstance(envelope.event, Added)
    resource = envelope.event.resource
    assert isinstance(resource, CustomResource)
    assert resource.value == {"tag": "v1", "n": 3}


def test_unknown_type_or_version_is_a_typed_error() -> None:
    event = ENCODER.encode(Added(StoredObject("a", "e")), 1)
    document = json.loads(event.to_structured())
    for field, value in (("type", "dev.koprs.external.added.v2"), ("type", "com.example.other")):
        with pytest.raises(UnknownEventTypeError):
            decode_structured(json.dumps({**document, field: value}))
    with pytest.raises(UnknownEventTypeError):
        decode_structured(
            json.dumps({**document, "dataschema": "https://koprs.dev/schemas/bridge/v2/x.json"})
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "not-hex"}, "does not match"),
        ({"specversion": "0.3"}, "does not match"),
        ({"time": "yesterday"}, "time|malformed"),
        ({"data": {"path": "a"}}, "CloudEvent data does not match"),
        ({"data": {"path": "a", "etag": "e", "size": -1, "last_modified": None}}, "size"),
    ],
)
def test_invalid_events_name_the_problem(change: dict[str, Any], message: str) -> None:
    event = ENCODER.encode(Added(StoredObject("a", "e")), 1)
    document = {**json.loads(event.to_structured()), **change}
    with pytest.raises(DecodeError, match=message):
        decode_structured(json.dumps(document))


@settings(max_examples=300, deadline=None)
@given(
    subject=st.text(max_size=30),
    headers=st.one_of(
        st.none(), st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=6)
    ),
    body=st.binary(max_size=200),
)
def test_arbitrary_nats_messages_raise_only_decode_errors(
    subject: str, headers: dict[str, str] | None, body: bytes
) -> None:
    with contextlib.suppress(DecodeError):
        decode_nats(subject, headers, body)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(
        st.one_of(
            st.binary(max_size=12), st.sampled_from([b"event", b"data", b"ce-id", b"ce-type"])
        ),
        st.binary(max_size=120),
        max_size=6,
    )
)
def test_arbitrary_redis_entries_raise_only_decode_errors(fields: dict[bytes, bytes]) -> None:
    with contextlib.suppress(DecodeError):
        decode_redis_entry(b"koprs:external:x", fields)


@settings(max_examples=200, deadline=None)
@given(
    attrs=st.fixed_dictionaries(
        {"type": st.sampled_from(["dev.koprs.external.added.v1", "dev.koprs.external.removed.v1"])},
        optional={
            "id": st.text(max_size=40),
            "time": st.text(max_size=40),
            "dataschema": st.sampled_from(
                ["https://koprs.dev/schemas/bridge/v1/stored-object.json", "x", ""]
            ),
        },
    ),
    data=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=10,
    ),
)
def test_arbitrary_json_events_raise_only_decode_errors(attrs: dict[str, str], data: Any) -> None:
    with contextlib.suppress(DecodeError):
        decode_structured(json.dumps({**attrs, "specversion": "1.0", "data": data}))
