"""End to end: sources -> bridge -> real broker -> a consumer written with the raw clients.

Every received event is validated against the JSON Schemas in ``schemas/``. The servers are
real: nats-server (JetStream), redis-server, an S3 server and an HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from tests.support.httpserver import Documents
from tests.support.receiving import (
    Received,
    fresh_nats,
    nats_consumer,
    redis_consumer,
)
from tests.support.servers import NatsServer, RedisServer, S3Server

# -- a scriptable HTTP document ------------------------------------------------------------

DOC = "app.json"


@pytest.fixture
def document() -> Iterator[tuple[Documents, str]]:
    with Documents() as docs:
        yield docs, docs.url(DOC)


# -- raw consumers --------------------------------------------------------------------------


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
