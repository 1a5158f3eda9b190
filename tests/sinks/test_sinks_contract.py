"""The ``Sink`` contract, run against every sink: memory, NATS and Redis (both content modes).

What a consumer reads back is read with the raw client libraries (nats-py JetStream pull
consumers, redis-py ``XRANGE``/``HGETALL``), decoded by the rules of each content mode, and
validated against the JSON Schemas in ``schemas/``. Backend-specific behaviour is tested in
``test_sinks_memory.py``, ``test_sinks_nats.py`` and ``test_sinks_redis.py``, which import the
helpers below.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import jsonschema
import nats
import nats.js.api
import pytest
import redis.asyncio
from nats.aio.msg import Msg

from bridge.cloudevents import CloudEvent, EventEncoder, header_value
from bridge.errors import PublishError
from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.schemas import load_schema
from bridge.sinks import Sink
from bridge.sinks.memory import MemorySink
from bridge.sinks.nats import ContentMode, NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig, items_key
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject
from bridge.subjects import decode_item_token, redis_stream_key
from tests.servers import NatsServer, RedisServer

ENVELOPE_SCHEMA = "https://koprs.dev/schemas/bridge/v1/cloudevent.json"
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
    return event


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
    """``count`` messages of an ephemeral pull consumer (raw nats-py)."""
    sub = await js.pull_subscribe(
        subject_filter,
        stream=stream,
        config=nats.js.api.ConsumerConfig(
            deliver_policy=deliver_policy, ack_policy=nats.js.api.AckPolicy.NONE
        ),
    )
    msgs: list[Msg] = []
    try:
        while len(msgs) < count:
            msgs += await sub.fetch(count - len(msgs), timeout=10)
    finally:
        await sub.unsubscribe()
    return msgs


# -- backends --


@dataclass
class Backend:
    """A connected sink plus what a test needs to look at what it published."""

    name: str
    sink: Sink
    read: Callable[[str], Awaitable[list[dict[str, Any]]]]
    """Every event published for a source, in order, decoded and validated."""
    current: Callable[[str], Awaitable[dict[str, dict[str, Any]]]]
    """The latest event of every item still present, by item key."""
    outage: Callable[[], None]
    """Make the broker unavailable (the next publish must fail)."""
    recover: Callable[[], None]
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


async def memory_backend() -> Backend:
    sink = MemorySink()

    async def read(source: str) -> list[dict[str, Any]]:
        return [_validated(event) for event in expected(sink.events(source))]

    async def current(source: str) -> dict[str, dict[str, Any]]:
        return {
            key: _validated(json.loads(ev.to_structured()))
            for key, ev in sink.items(source).items()
        }

    return Backend("memory", sink, read, current, lambda: sink.fail_next(1), lambda: None)


def _validated(event: dict[str, Any]) -> dict[str, Any]:
    validate(event)
    return event


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


async def nats_backend(server: NatsServer, mode: str) -> Backend:
    config = nats_test_config(server.url, content_mode=content_mode(mode))
    sink = NatsSink(config)
    await sink.connect()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.05)
    js = nc.jetstream()

    async def read(source: str) -> list[dict[str, Any]]:
        subject_filter = f"{config.subject_prefix}.{source}.>"
        info = await js.stream_info(config.stream, subjects_filter=subject_filter)
        count = sum((info.state.subjects or {}).values())
        return [decode_nats(m) for m in await fetch_all(js, config.stream, subject_filter, count)]

    async def current(source: str) -> dict[str, dict[str, Any]]:
        subject_filter = f"{config.subject_prefix}.{source}.>"
        info = await js.stream_info(config.stream, subjects_filter=subject_filter)
        subjects = info.state.subjects or {}
        msgs = await fetch_all(
            js,
            config.stream,
            subject_filter,
            len(subjects),
            nats.js.api.DeliverPolicy.LAST_PER_SUBJECT,
        )
        latest = {}
        for msg in msgs:
            event = decode_nats(msg)
            token = msg.subject.rsplit(".", 1)[1]
            assert decode_item_token(token) in (event["subject"], None)
            if not event["type"].endswith(".removed.v1"):
                latest[event["subject"]] = event
        return latest

    async def close() -> None:
        try:
            await js.delete_stream(config.stream)
        finally:
            await nc.close()

    backend = Backend(f"nats-{mode}", sink, read, current, server.stop, server.start)
    backend.closers.append(close)
    return backend


async def redis_backend(server: RedisServer, url: str, mode: str) -> Backend:
    sink = RedisSink(RedisSinkConfig(url=url, content_mode=content_mode(mode), timeout_s=2.0))
    await sink.connect()
    client = redis.asyncio.Redis.from_url(url)

    async def read(source: str) -> list[dict[str, Any]]:
        entries = await xrange(client, redis_stream_key(source))
        return [decode_redis(fields) for _id, fields in entries]

    async def current(source: str) -> dict[str, dict[str, Any]]:
        items = cast(dict[bytes, bytes], await client.hgetall(items_key(source)))
        latest = {}
        for key, entry_id in items.items():
            [(_id, fields)] = await xrange(client, redis_stream_key(source), entry_id, entry_id)
            event = decode_redis(fields)
            assert event["subject"] == key.decode()
            latest[event["subject"]] = event
        return latest

    backend = Backend(f"redis-{mode}", sink, read, current, server.stop, server.start)
    backend.closers.append(client.aclose)
    return backend


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("nats-binary", marks=pytest.mark.servers, id="nats-binary"),
    pytest.param("nats-structured", marks=pytest.mark.servers, id="nats-structured"),
    pytest.param("redis-binary", marks=pytest.mark.servers, id="redis-binary"),
    pytest.param("redis-structured", marks=pytest.mark.servers, id="redis-structured"),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        made = await memory_backend()
    elif kind.startswith("nats-"):
        request.getfixturevalue("nats_url")  # a running server
        made = await nats_backend(request.getfixturevalue("nats_server"), kind[5:])
    else:
        url = request.getfixturevalue("redis_url")  # a running, empty server
        made = await redis_backend(request.getfixturevalue("redis_server"), url, kind[6:])
    try:
        yield made
    finally:
        made.recover()
        await made.sink.aclose()
        for close in made.closers:
            await close()


# -- the contract --


async def test_is_a_sink(backend: Backend) -> None:
    assert isinstance(backend.sink, Sink)
    assert backend.sink.description


async def test_published_events_read_back_in_order(backend: Backend) -> None:
    events = [*object_events(["a", "b", "c"]), *object_events(["a"], kind=Modified, revision=2)]
    await backend.sink.publish("files", events)
    web = [http_event(), http_event(body=b"\xff\xfe binary", kind=Modified, revision=2)]
    await backend.sink.publish("web", web)

    assert await backend.read("files") == expected(events)
    assert await backend.read("web") == expected(web)


async def test_empty_batch_is_a_no_op(backend: Backend) -> None:
    await backend.sink.publish("files", [])
    assert await backend.read("files") == []


async def test_connect_is_idempotent(backend: Backend) -> None:
    await backend.sink.connect()
    await backend.sink.connect()
    events = object_events(["a"])
    await backend.sink.publish("files", events)
    assert await backend.read("files") == expected(events)


async def test_same_event_published_twice_is_stored_once(backend: Backend) -> None:
    first = object_events(["a", "b"])
    await backend.sink.publish("files", first)
    await backend.sink.publish("files", first)
    more = object_events(["c"])
    await backend.sink.publish("files", [*first, *more])  # a retried batch, partly new

    assert await backend.read("files") == expected([*first, *more])


async def test_item_keys_of_any_shape(backend: Backend) -> None:
    events = object_events(SPECIAL_KEYS)
    await backend.sink.publish("files", events)

    read = await backend.read("files")
    assert read == expected(events)
    # exactly, blanks and line breaks included, in every content mode
    assert [event["subject"] for event in read] == SPECIAL_KEYS
    assert [event["data"]["path"] for event in read] == SPECIAL_KEYS
    assert sorted(await backend.current("files")) == sorted(SPECIAL_KEYS)


async def test_current_state_is_the_latest_event_per_item(backend: Backend) -> None:
    added = object_events(["a", "b", "c.d"])
    modified = object_events(["a"], kind=Modified, revision=2, etag="e2")
    removed = object_events(["b"], kind=Removed, revision=3)
    await backend.sink.publish("files", added)
    await backend.sink.publish("files", [*modified, *removed])

    current = await backend.current("files")
    assert current == {"a": expected(modified)[0], "c.d": expected(added)[2]}


async def test_sources_are_kept_apart(backend: Backend) -> None:
    files = object_events(["same-key"], source_name="files")
    other = object_events(["same-key"], source_name="other")
    await backend.sink.publish("files", files)
    await backend.sink.publish("other", other)

    assert await backend.read("files") == expected(files)
    assert await backend.read("other") == expected(other)


async def test_batches_larger_than_one_round_trip(backend: Backend) -> None:
    events = object_events([f"item-{i:05d}" for i in range(5000)])
    await backend.sink.publish("files", events)
    assert await backend.read("files") == expected(events)


async def test_invalid_source_name_is_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="source name"):
        await backend.sink.publish("bad.name", object_events(["a"]))


async def test_unavailable_broker_fails_the_publish_then_recovers(backend: Backend) -> None:
    first = object_events(["a"])
    second = object_events(["b", "c"])
    await backend.sink.publish("files", first)

    backend.outage()
    with pytest.raises(PublishError):
        await backend.sink.publish("files", second)
    backend.recover()

    await backend.sink.publish("files", [*first, *second])  # the caller retries the batch
    events = await backend.read("files")
    assert events == expected([*first, *second])
