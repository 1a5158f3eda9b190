"""Events for tests and how a consumer reads them back from each broker.

Encoded events (:func:`object_events`, :func:`http_event`), the structured form they must
decode to (:func:`expected`), schema validation, decoding of NATS messages and Redis entries in
either content mode, raw reads (:func:`fetch_all`, :func:`xrange`), and a NATS sink config with
a stream of its own per test (:func:`nats_test_config`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import jsonschema
import nats
import nats.js.api
import nats.js.errors
import redis.asyncio
from nats.aio.msg import Msg

from bridge.cloudevents import CloudEvent, EventEncoder, header_value
from bridge.events import Added, ExternalEvent
from bridge.schemas import load_schema
from bridge.sinks.nats import ContentMode, NatsSinkConfig
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject

ENVELOPE_SCHEMA = "https://koprs.dev/schemas/bridge/v1/cloudevent.json"
STATE_SCHEMA = "https://koprs.dev/schemas/bridge/v1/state-headers.json"
FIXED_NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SPECIAL_KEYS = [
    "plain",
    "dir/file.yaml",
    "a.b.c",
    "with space",
    "ünïcödé/日本語.txt",
    "star*and>gt",
    "tilde~name",
    "emoji 🎉",
    "  padded  ",  # blanks and line breaks: binary mode percent-encodes header values
    "line\nbreak",
    "cr\r\nlf\r",
    "tab\there",
    '100% "quoted"',
    "x" * 300,  # longer than a subject token may be: hashed token
]

# -- events --


def encoder(source_name: str = "files", uri: str = "s3://bucket/prefix") -> EventEncoder:
    return EventEncoder(source_name, uri, now=lambda: FIXED_NOW)


def object_events(
    keys: Sequence[str],
    *,
    kind: type[ExternalEvent[Any]] = Added,
    revision: int = 1,
    source_name: str = "files",
    etag: str = "e1",
) -> list[CloudEvent]:
    enc = encoder(source_name)
    return [enc.encode(kind(StoredObject(key, etag, 42, FIXED_NOW)), revision) for key in keys]


def http_event(
    url: str = "https://example.test/config.json",
    body: bytes = b'{"replicas": 3}',
    *,
    kind: type[ExternalEvent[Any]] = Added,
    revision: int = 1,
    source_name: str = "web",
) -> CloudEvent:
    resource = HttpResource(
        url=url, status=200, body=body, etag='"v1"', content_type="application/json"
    )
    return EventEncoder(source_name, url, now=lambda: FIXED_NOW).encode(kind(resource), revision)


def expected(events: Sequence[CloudEvent]) -> list[dict[str, Any]]:
    """The structured-mode form every decoded event must equal."""
    return [json.loads(event.to_structured()) for event in events]


# -- decoding and validation, as a consumer would --


def validate(event: dict[str, Any]) -> None:
    checker = jsonschema.FormatChecker()
    jsonschema.Draft202012Validator(load_schema(ENVELOPE_SCHEMA), format_checker=checker).validate(
        event
    )
    jsonschema.Draft202012Validator(
        load_schema(event["dataschema"]), format_checker=checker
    ).validate(event["data"])


def decode_nats(msg: Msg) -> dict[str, Any]:
    """A JetStream message in either content mode -> the structured form (validated).

    Binary mode: ``ce-*`` header values are percent-encoded (CloudEvents HTTP binding rules).
    """
    headers = msg.headers or {}
    if headers.get("content-type") == "application/cloudevents+json":
        event: dict[str, Any] = json.loads(msg.data)
    else:
        event = {k[3:]: header_value(v) for k, v in headers.items() if k.startswith("ce-")}
        event["datacontenttype"] = headers["content-type"]
        event["data"] = json.loads(msg.data)
    assert headers["Nats-Msg-Id"] == event["id"]
    validate(event)
    validate_state_headers(headers, event)
    return event


def decode_redis(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A stream entry in either content mode -> the structured form (validated).

    Binary mode: the ``ce-*`` fields are percent-encoded like the binary-mode headers.
    """
    if b"event" in fields:
        event: dict[str, Any] = json.loads(fields[b"event"])
    else:
        event = {
            k.decode()[3:]: header_value(v.decode())
            for k, v in fields.items()
            if k.startswith(b"ce-")
        }
        event["datacontenttype"] = fields[b"content-type"].decode()
        event["data"] = json.loads(fields[b"data"])
    validate(event)
    validate_state_headers({k.decode(): v.decode() for k, v in fields.items()}, event)
    return event


def validate_state_headers(headers: dict[str, str], event: dict[str, Any]) -> None:
    """The ``koprs-*`` headers or fields, when there (an event the tests encoded without a
    revision has none), against ``schemas/v1/state-headers.json`` and the event's type."""
    state = {k: v for k, v in headers.items() if k.startswith("koprs-")}
    if not state:
        return
    jsonschema.Draft202012Validator(load_schema(STATE_SCHEMA)).validate(state)
    assert event["type"] == f"dev.koprs.external.{state['koprs-kind']}.v1"


Entry = tuple[bytes, dict[bytes, bytes]]


async def xrange(
    client: redis.asyncio.Redis, key: str, start: str | bytes = "-", end: str | bytes = "+"
) -> list[Entry]:
    """``XRANGE`` with the types a bytes client returns (redis-py types it loosely)."""
    return cast(list[Entry], await client.xrange(key, start, end))


async def fetch_all(
    js: nats.js.JetStreamContext,
    stream: str,
    subject_filter: str,
    count: int,
    deliver_policy: nats.js.api.DeliverPolicy = nats.js.api.DeliverPolicy.ALL,
) -> list[Msg]:
    """``count`` messages of an ephemeral pull consumer (raw nats-py).

    On a cluster a new consumer may answer 503 until it is placed: asked again then."""
    sub = await js.pull_subscribe(
        subject_filter,
        stream=stream,
        config=nats.js.api.ConsumerConfig(
            deliver_policy=deliver_policy, ack_policy=nats.js.api.AckPolicy.NONE
        ),
    )
    msgs: list[Msg] = []
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while len(msgs) < count:
            try:
                msgs += await sub.fetch(count - len(msgs), timeout=10)
            except nats.js.errors.ServiceUnavailableError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()
    return msgs


def content_mode(name: str) -> ContentMode:
    assert name in ("binary", "structured")
    return cast(ContentMode, name)


def nats_test_config(url: str, **overrides: Any) -> NatsSinkConfig:
    """A stream and subject prefix of its own for each test (streams outlive tests)."""
    tag = uuid.uuid4().hex[:12]
    settings: dict[str, Any] = {
        "url": url,
        "stream": f"T{tag}",
        "subject_prefix": f"t{tag}.koprs.external",
        "ack_timeout_s": 2.0,
        "connect_timeout_s": 2.0,
        "reconnect_wait_s": 0.05,
    }
    settings.update(overrides)
    return NatsSinkConfig(**settings)
