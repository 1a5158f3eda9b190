"""End to end: sources -> bridge -> real broker -> a consumer written with the raw clients.

Every received event is validated against the JSON Schemas in ``schemas/``. The servers are
real: nats-server (JetStream), redis-server, an S3 server and an HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import nats
import pytest
import redis.asyncio as aioredis
from nats.js.api import DeliverPolicy

from bridge.cloudevents import header_value
from bridge.schemas import load_schema
from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from tests.documents import Documents
from tests.servers import NatsServer, RedisServer, S3Server

ENVELOPE = "https://koprs.dev/schemas/bridge/v1/cloudevent.json"


# -- a scriptable HTTP document ------------------------------------------------------------

DOC = "app.json"


@pytest.fixture
def document() -> Iterator[tuple[Documents, str]]:
    with Documents() as docs:
        yield docs, docs.url(DOC)


# -- raw consumers --------------------------------------------------------------------------


@dataclass
class Received:
    """Events a raw consumer decoded, validated against the schemas."""

    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, event: dict[str, Any]) -> None:
        validate(event)
        async with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
        async with asyncio.timeout(60), self.changed:
            await self.changed.wait_for(lambda: predicate(self.events))

    def seen(self, source: str) -> list[tuple[str, str]]:
        return [
            (e["type"].split(".")[-2], e["subject"])
            for e in self.events
            if e["subject"] and e["_source_name"] == source
        ]


def validate(event: dict[str, Any]) -> None:
    envelope = {k: v for k, v in event.items() if not k.startswith("_")}
    jsonschema.Draft202012Validator(
        load_schema(ENVELOPE), format_checker=jsonschema.FormatChecker()
    ).validate(envelope)
    jsonschema.Draft202012Validator(
        load_schema(event["dataschema"]), format_checker=jsonschema.FormatChecker()
    ).validate(event["data"])


def decode_nats(subject: str, headers: dict[str, str] | None, body: bytes) -> dict[str, Any]:
    headers = headers or {}
    if "ce-id" in headers:  # binary mode
        event: dict[str, Any] = {
            k[3:]: header_value(v) for k, v in headers.items() if k.startswith("ce-")
        }
        event["datacontenttype"] = headers["content-type"]
        event["data"] = json.loads(body)
        assert headers["Nats-Msg-Id"] == event["id"]
    else:
        event = json.loads(body)
    event["_source_name"] = subject.split(".")[2]
    return event


@contextlib.asynccontextmanager
async def nats_consumer(url: str) -> AsyncIterator[Received]:
    received = Received()
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()

    async def on_message(msg: Any) -> None:
        await received.add(decode_nats(msg.subject, msg.headers, msg.data))
        await msg.ack()

    # The stream may not exist yet: the bridge creates it. Retry until it does.
    while True:
        try:
            sub = await js.subscribe(
                "koprs.external.>",
                cb=on_message,
                deliver_policy=DeliverPolicy.ALL,
                ordered_consumer=True,
            )
            break
        except nats.js.errors.NotFoundError:
            await asyncio.sleep(0.05)
    try:
        yield received
    finally:
        await sub.unsubscribe()
        await nc.close()


# -- the bridge under test ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_bridge(raw: dict[str, Any]) -> AsyncIterator[Bridge]:
    bridge = Bridge(parse_config(raw, env={}), shutdown_grace_s=1)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield bridge
    finally:
        stop.set()
        await task


def sources(doc_url: str, s3: S3Server, bucket: str) -> list[dict[str, Any]]:
    return [
        {"name": "doc", "interval": 0.05, "max_backoff": 0.2, "http": {"url": doc_url}},
        {
            "name": "bucket",
            "interval": 0.05,
            "max_backoff": 0.2,
            "s3": {
                "bucket": bucket,
                "prefix": "cfg/",
                "endpoint_url": s3.endpoint_url,
                "region": s3.region,
                "access_key_id": s3.access_key,
                "secret_access_key": s3.secret_key,
            },
        },
    ]


async def settle(bridge: Bridge) -> None:
    """Wait until every source has done two more rounds, so anything pending went out."""
    await bridge.connected.wait()
    for loop in bridge.loops.values():
        target = loop.steps + 2
        async with asyncio.timeout(60):
            await loop.wait_for_steps(target)


async def script(
    doc: Documents, s3: S3Server, bucket: str, received: Received, bridge: Bridge
) -> None:
    """A scripted sequence of changes, each awaited at the consumer before the next."""
    client = s3.client()

    def has(n: int, source: str) -> Callable[[list[dict[str, Any]]], bool]:
        return lambda _: len(received.seen(source)) >= n

    doc.set(DOC, b'{"v": 1}')
    client.put_object(Bucket=bucket, Key="cfg/a.yaml", Body=b"a1")
    client.put_object(Bucket=bucket, Key="cfg/dir/b c.yaml", Body=b"b1")
    client.put_object(Bucket=bucket, Key="other/ignored", Body=b"x")
    await received.wait_for(has(1, "doc"))
    await received.wait_for(has(2, "bucket"))
    doc.set(DOC, b'{"v": 2}')
    client.put_object(Bucket=bucket, Key="cfg/a.yaml", Body=b"a2")
    await received.wait_for(has(2, "doc"))
    await received.wait_for(has(3, "bucket"))
    doc.set(DOC, None)
    client.delete_object(Bucket=bucket, Key="cfg/dir/b c.yaml")
    await received.wait_for(has(3, "doc"))
    await received.wait_for(has(4, "bucket"))
    await settle(bridge)


def assert_history(received: Received, doc_url: str) -> None:
    assert received.seen("doc") == [("added", doc_url), ("modified", doc_url), ("removed", doc_url)]
    assert sorted(received.seen("bucket")[:2]) == [
        ("added", "cfg/a.yaml"),
        ("added", "cfg/dir/b c.yaml"),
    ]
    assert received.seen("bucket")[2:] == [
        ("modified", "cfg/a.yaml"),
        ("removed", "cfg/dir/b c.yaml"),
    ]
    ids = [e["id"] for e in received.events]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    bodies = [e["data"]["body"] for e in received.events if e["_source_name"] == "doc"]
    assert bodies[0] == {"encoding": "utf-8", "data": '{"v": 1}'}


async def fresh_nats(url: str) -> None:
    """Delete the streams earlier tests left on ``koprs.external.>``: each test starts empty."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and any(
                s.startswith("koprs.external") for s in info.config.subjects or ()
            ):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_nats_end_to_end(
    mode: str, nats_url: str, s3_server: S3Server, s3_bucket: str, document: tuple[Documents, str]
) -> None:
    doc, doc_url = document
    await fresh_nats(nats_url)
    raw = {
        "broker": {"url": nats_url, "content_mode": mode},
        "sources": sources(doc_url, s3_server, s3_bucket),
    }
    async with running_bridge(raw) as bridge, nats_consumer(nats_url) as received:
        await script(doc, s3_server, s3_bucket, received, bridge)
    assert_history(received, doc_url)


async def test_nats_down_at_start_and_mid_run_loses_nothing(
    nats_server: NatsServer,
    nats_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    document: tuple[Documents, str],
) -> None:
    doc, doc_url = document
    await fresh_nats(nats_url)
    raw = {
        "broker": {"url": nats_url, "ack_timeout": 1},
        "sources": sources(doc_url, s3_server, s3_bucket),
    }
    client = s3_server.client()
    nats_server.stop()
    doc.set(DOC, b"1")
    client.put_object(Bucket=s3_bucket, Key="cfg/a", Body=b"1")
    async with running_bridge(raw) as bridge:
        nats_server.start()  # down at start: the bridge waits and then publishes
        async with nats_consumer(nats_url) as received:
            await received.wait_for(
                lambda _: len(received.seen("bucket")) == 1 and len(received.seen("doc")) == 1
            )
            await settle(bridge)
            nats_server.stop()  # down mid-run: changes made now must arrive once it is back
            doc.set(DOC, b"2")
            client.put_object(Bucket=s3_bucket, Key="cfg/b", Body=b"1")
            client.delete_object(Bucket=s3_bucket, Key="cfg/a")
            loops = list(bridge.loops.values())
            for loop in loops:  # at least one failed publish while the server is down
                await loop.wait_for_steps(loop.steps + 2)
            nats_server.start()
            await received.wait_for(
                lambda _: len(received.seen("bucket")) == 3 and len(received.seen("doc")) == 2
            )
            await settle(bridge)
    assert received.seen("doc") == [("added", doc_url), ("modified", doc_url)]
    assert received.seen("bucket") == [("added", "cfg/a"), ("added", "cfg/b"), ("removed", "cfg/a")]
    ids = [e["id"] for e in received.events]
    assert len(ids) == len(set(ids))


# -- Redis Streams -----------------------------------------------------------------------------


def decode_redis(source: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
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
    event["_source_name"] = source
    return event


@contextlib.asynccontextmanager
async def redis_consumer(url: str, names: list[str]) -> AsyncIterator[Received]:
    received = Received()
    client = aioredis.from_url(url)
    positions: dict[Any, Any] = {f"koprs:external:{name}": "0-0" for name in names}

    async def follow() -> None:
        while True:
            try:
                replies: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
                replies = await client.xread(positions, block=100)  # type: ignore[assignment]
            except (ConnectionError, aioredis.ConnectionError):
                await asyncio.sleep(0.05)
                continue
            for key, entries in replies:
                for entry_id, fields in entries:
                    positions[key.decode()] = entry_id
                    await received.add(decode_redis(key.decode().rsplit(":", 1)[1], fields))

    task = asyncio.create_task(follow())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_redis_end_to_end(
    mode: str, redis_url: str, s3_server: S3Server, s3_bucket: str, document: tuple[Documents, str]
) -> None:
    doc, doc_url = document
    raw = {
        "broker": {"url": redis_url, "content_mode": mode},
        "sources": sources(doc_url, s3_server, s3_bucket),
    }
    async with (
        running_bridge(raw) as bridge,
        redis_consumer(redis_url, ["doc", "bucket"]) as received,
    ):
        await script(doc, s3_server, s3_bucket, received, bridge)
    assert_history(received, doc_url)


async def test_redis_restarted_mid_run_loses_nothing(
    redis_server: RedisServer,
    redis_url: str,
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    document: tuple[Documents, str],
) -> None:
    doc, doc_url = document
    raw = {
        "broker": {"url": redis_url, "ack_timeout": 1},
        "sources": sources(doc_url, s3_server, s3_bucket),
    }
    client = s3_server.client()
    doc.set(DOC, b"1")
    async with (
        running_bridge(raw) as bridge,
        redis_consumer(redis_url, ["doc", "bucket"]) as received,
    ):
        await received.wait_for(lambda _: len(received.seen("doc")) == 1)
        await settle(bridge)
        redis_server.stop()
        doc.set(DOC, b"2")
        client.put_object(Bucket=s3_bucket, Key="cfg/a", Body=b"1")
        for loop in list(bridge.loops.values()):
            await loop.wait_for_steps(loop.steps + 2)
        redis_server.start()  # without persistence: the stream restarts empty, events still come
        await received.wait_for(
            lambda _: len(received.seen("doc")) >= 2 and len(received.seen("bucket")) >= 1
        )
        await settle(bridge)
    assert received.seen("doc")[-1] == ("modified", doc_url)
    assert ("added", "cfg/a") in received.seen("bucket")
