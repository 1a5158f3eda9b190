"""The sinks a contract test runs against, each with what a test needs to look at what it
published: :func:`memory_backend`, :func:`nats_backend`, :func:`redis_backend` (a stream of
their own per test, read back with the raw clients and validated).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import nats
import nats.js.api

from bridge.connections import redis_client
from bridge.sinks import Sink
from bridge.sinks.memory import MemorySink
from bridge.sinks.nats import NatsSink
from bridge.sinks.redis import RedisSink, RedisSinkConfig, items_key
from bridge.subjects import decode_item_token, redis_stream_key

if TYPE_CHECKING:
    from bridge.sources.stores.s3 import S3Store

from tests.support.clusters import NatsCluster, RedisClusterSet, SentinelSet
from tests.support.events import (
    content_mode,
    decode_nats,
    decode_redis,
    expected,
    fetch_all,
    nats_test_config,
    validate,
    xrange,
)
from tests.support.servers import NatsServer, RedisServer, S3Server, ServerProcess

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


async def nats_backend(
    server: NatsServer | NatsCluster, mode: str, *, replicas: int = 1, name: str = "nats"
) -> Backend:
    config = nats_test_config(server.url, content_mode=content_mode(mode), replicas=replicas)
    sink = NatsSink(config)
    await sink.connect()
    nc = await nats.connect(
        server.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.05
    )
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

    if isinstance(server, NatsCluster):
        cluster = server

        def recover() -> None:  # every node back, and the stream has elected its leader
            cluster.ensure_running()
            cluster.wait_stream_healthy(config.stream)

        outage = _stop_all(server.nodes)
    else:
        outage, recover = server.stop, server.start
    backend = Backend(f"{name}-{mode}", sink, read, current, outage, recover)
    backend.closers.append(close)
    return backend


async def redis_backend(
    server: RedisServer | RedisClusterSet | SentinelSet, url: str, mode: str, name: str = "redis"
) -> Backend:
    sink = RedisSink(RedisSinkConfig(url=url, content_mode=content_mode(mode), timeout_s=2.0))
    await sink.connect()
    client = redis_client(url)  # a cluster client for redis+cluster://

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

    if isinstance(server, RedisClusterSet):
        outage, recover = _stop_all(server.nodes), server.restore
    elif isinstance(server, SentinelSet):
        outage, recover = _stop_all(server.data_nodes), server.restore
    else:
        outage, recover = server.stop, server.start
    backend = Backend(f"{name}-{mode}", sink, read, current, outage, recover)
    backend.closers.append(client.aclose)
    return backend


def _stop_all(nodes: Sequence[ServerProcess]) -> Callable[[], None]:
    def stop() -> None:
        for node in nodes:
            node.stop()

    return stop


def make_store(server: S3Server, bucket: str, *, page_size: int = 1000) -> S3Store:
    from bridge.sources.stores.s3 import S3Store

    return S3Store(
        bucket,
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        page_size=page_size,
    )
