"""The shipped least-privilege consumer users (``deploy/security/``) can dead-letter a poison
event, read delivery counts and see their consumers (``tail --stats``), and still cannot publish
events."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.js.errors
import pytest

from bridge.connections import connect_nats, redis_client
from bridge.consumer import Delivery, EventHandler, Synced, run_handler, watch_nats, watch_redis
from bridge.consumer.inspection import nats_stats, redis_stats
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from tests.support.events import object_events
from tests.support.permissions import (
    BRIDGE_NATS,
    BRIDGE_REDIS,
    CONSUMER_NATS,
    CONSUMER_REDIS,
    STREAM,
    acl_log,
    admin_nats,
    admin_redis,
    auth,
    nats_server,
    redis_server,
    violations,
)
from tests.support.replicas import until
from tests.support.servers import NatsServer, RedisServer

pytestmark = pytest.mark.servers
__all__ = ["admin_redis", "nats_server", "redis_server"]  # fixtures of the permission tests


class Poisoned(EventHandler[None]):
    def __init__(self) -> None:
        self.synced = asyncio.Event()
        self.handled = asyncio.Event()

    async def handle_synced(self, synced: Synced, state: None) -> None:
        self.synced.set()

    async def handle_delivery(self, delivery: Delivery, state: None) -> None:
        if delivery.envelope.key == "poison":
            raise RuntimeError("cannot handle it")
        self.handled.set()


async def poison_then_sentinel(watch: Any, publish: Any, done: Any) -> None:
    """Handle a poison event and a good one; return once ``done()`` (the dead letter is in)."""
    handler = Poisoned()
    task = asyncio.create_task(run_handler(handler, watch))
    try:
        async with asyncio.timeout(30):
            await handler.synced.wait()
        await publish(object_events(["poison"], revision=1))
        await publish(object_events(["z"], revision=2))
        async with asyncio.timeout(30):
            await handler.handled.wait()
        await until(done, "the dead letter written and acknowledged")
    finally:
        await watch.aclose()
        async with asyncio.timeout(10):
            await task


async def test_nats_consumer_user_dead_letters(nats_server: NatsServer) -> None:
    nc = await admin_nats(nats_server)
    try:
        for name in (STREAM, f"{STREAM}_DEADLETTER"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()
    sink = NatsSink(NatsSinkConfig(url=nats_server.url, auth=auth("koprs-bridge", BRIDGE_NATS)))
    await sink.connect()
    reader = auth("koprs-consumer", CONSUMER_NATS)
    try:
        watch = watch_nats(
            nats_server.url, ["files"], durable="ops", auth=reader, fetch_timeout_s=1,
            max_deliveries=1,
        )  # fmt: skip

        async def publish(batch: Any) -> None:
            await sink.publish("files", batch)

        async def stats_now() -> dict[str, Any]:
            nc = await connect_nats(nats_server.url, auth=reader)
            try:
                return await nats_stats(nc.jetstream(), STREAM)
            finally:
                await nc.close()

        async def done() -> bool:
            now = await stats_now()
            return bool(now["dead_letters"]["count"]) and not any(
                c["unacknowledged"] for c in now["consumers"]
            )

        await poison_then_sentinel(watch, publish, done)
    finally:
        await sink.aclose()
    stats = await stats_now()
    [ops] = [c for c in stats["consumers"] if c["name"] == "ops"]
    assert ops["unacknowledged"] == 0
    assert stats["dead_letters"]["count"] == 1
    assert violations(nats_server) == []


async def test_redis_consumer_user_dead_letters(
    redis_server: RedisServer, admin_redis: Any
) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_server.url, auth=auth("koprs-bridge", BRIDGE_REDIS)))
    reader = auth("koprs-consumer", CONSUMER_REDIS)
    try:
        watch = watch_redis(
            redis_server.url, ["files"], group="ops", auth=reader, block_s=0.2,
            max_deliveries=2, claim_idle_s=0.05, prune_idle_s=0,
        )  # fmt: skip

        async def publish(batch: Any) -> None:
            await sink.publish("files", batch)

        async def stats_now() -> dict[str, Any]:
            client: Any = redis_client(redis_server.url, auth=reader)
            try:
                return await redis_stats(client, ["files"])
            finally:
                await client.aclose()

        async def done() -> bool:
            [now] = (await stats_now())["sources"]
            return bool(now["dead_letters"]["count"]) and now["groups"][0]["pending"] == 0

        await poison_then_sentinel(watch, publish, done)
    finally:
        await sink.aclose()
    stats = await stats_now()
    [files] = stats["sources"]
    assert files["dead_letters"]["count"] == 1
    assert files["groups"][0]["pending"] == 0
    assert await acl_log(admin_redis) == []
