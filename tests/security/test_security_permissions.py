"""Least privilege: the bridge and its consumers work with exactly the documented rights.

The servers run the permission sets shipped in ``deploy/security/``:

* nats-server with the users of ``nats-permissions.conf`` (``koprs-bridge``, ``koprs-consumer``)
  plus an unrestricted ``admin`` for the test's own reads;
* redis-server with the ACL users of ``redis-acl.conf`` (``koprs-bridge``, ``koprs-consumer``),
  the default user off, plus ``admin``.

The bridge publishes through NATS and through Redis, with leader election on the same
restricted Redis user: events arrive, checkpoints are written, leases are taken and released,
``koprs-bridge status`` reads them, and the servers log no denied operation (Redis ``ACL LOG``
stays empty, nats-server logs no permissions violation). A consumer user consumes with a
durable consumer / consumer group but may not publish. The variant for a stream created
beforehand (no CREATE/UPDATE rights) works, and says which right is missing when the stream
differs from the config.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import redis.asyncio
import redis.exceptions
import yaml

from bridge.cli import main
from bridge.connection_settings import AuthConfig
from bridge.connections import connect_nats, redis_client
from bridge.consumer import Delivery, Synced
from bridge.consumer.nats import watch_nats
from bridge.consumer.redis import watch_redis
from bridge.errors import PublishError
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.subjects import encode_item_token
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
    fresh_stream,
    nats_precreated,
    nats_server,
    nats_users,
    redis_server,
    violations,
)
from tests.support.security import recording_logs, running_bridge
from tests.support.servers import NatsServer, RedisServer

pytestmark = pytest.mark.servers
__all__ = ["admin_redis", "nats_precreated", "nats_server", "redis_server"]  # fixtures


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "a.txt").write_text("a1")
    (folder / "b.txt").write_text("b1")
    return folder


def source(drop: Path) -> list[dict[str, Any]]:
    return [{"name": "drop", "interval": 0.05, "max_backoff": 0.2, "local": {"path": str(drop)}}]


def election(server: RedisServer) -> dict[str, Any]:
    return {
        "redis_url": server.url,
        "lease_ttl": "3s",
        "auth": {"username": "koprs-bridge", "password": BRIDGE_REDIS},
    }


async def settled(bridge: Any) -> None:
    """Wait until the source's loop made two more steps: the last publish is committed."""
    loop = bridge.coordinator.led["drop"].loop
    async with asyncio.timeout(60):
        await loop.wait_for_steps(loop.steps + 2)


# -- the bridge -----------------------------------------------------------------------------


async def test_bridge_on_nats_with_election_on_redis(
    nats_server: NatsServer,
    redis_server: RedisServer,
    admin_redis: Any,
    drop: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fresh_stream(nats_server)
    config = {
        "broker": {
            "url": nats_server.url,
            "auth": {"username": "koprs-bridge", "password": BRIDGE_NATS},
        },
        "leader_election": election(redis_server),
        "sources": source(drop),
    }
    with recording_logs(logging.INFO) as logs:
        async with running_bridge(config, replica="replica-1") as (bridge, published):
            await published.wait_for(2)
            await settled(bridge)
            (drop / "a.txt").write_text("a2")  # Modified
            (drop / "b.txt").unlink()  # Removed
            await published.wait_for(4)
            await settled(bridge)
            lease = await admin_redis.get("koprs:bridge:{drop}:lease")
            revision = await admin_redis.hget("koprs:bridge:{drop}:meta", "revision")
            state = await admin_redis.hkeys("koprs:bridge:{drop}:state")
            config_file = tmp_path / "bridge.yaml"
            config_file.write_text(yaml.safe_dump(config))
            capsys.readouterr()
            assert await asyncio.to_thread(main, ["status", "--config", str(config_file)]) == 0
            status = capsys.readouterr().out
        released = await admin_redis.get("koprs:bridge:{drop}:lease")

    assert [e.type.split(".")[-2] for _, e in published.events] == [
        "added",
        "added",
        "modified",
        "removed",
    ]
    assert lease is not None
    assert lease.decode().startswith("replica-1|")
    assert revision is not None
    assert [k.decode() for k in state] == ["a.txt"]
    assert "replica-1" in status
    assert released is None, "the lease is given back on shutdown"
    assert await acl_log(admin_redis) == []
    assert violations(nats_server) == []
    assert logs.warnings() == []

    nc = await admin_nats(nats_server)
    try:
        js = nc.jetstream()
        msg = await js.get_last_msg(STREAM, f"koprs.external.drop.{encode_item_token('a.txt')}")
        assert msg.headers is not None
        assert msg.headers["ce-type"].endswith(".modified.v1")
    finally:
        await nc.close()


async def test_bridge_on_redis_with_election_on_the_same_user(
    redis_server: RedisServer, admin_redis: Any, drop: Path
) -> None:
    bridge_auth = {"username": "koprs-bridge", "password": BRIDGE_REDIS}
    config = {
        "broker": {"url": redis_server.url, "auth": bridge_auth},
        "leader_election": election(redis_server),
        "sources": source(drop),
    }
    with recording_logs(logging.INFO) as logs:
        async with running_bridge(config) as (bridge, published):
            await published.wait_for(2)
            await settled(bridge)
    entries = await admin_redis.xrange("koprs:external:drop")
    assert len(entries) == 2
    assert sorted(k.decode() for k in await admin_redis.hkeys("{koprs:external:drop}:items")) == [
        "a.txt",
        "b.txt",
    ]

    # the sink's other paths: a batch published again (all markers exist), and one partly
    sink = RedisSink(RedisSinkConfig(url=redis_server.url, auth=auth("koprs-bridge", BRIDGE_REDIS)))
    try:
        events = object_events(["x", "y"], source_name="drop")
        await sink.publish("drop", events)
        await sink.publish("drop", events)
        await sink.publish("drop", [*events, *object_events(["z"], source_name="drop")])
    finally:
        await sink.aclose()
    assert len(await admin_redis.xrange("koprs:external:drop")) == 5
    assert await acl_log(admin_redis) == []
    assert logs.warnings() == []


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_restart_without_a_state_store_recovers_with_the_shipped_rights(
    kind: str,
    nats_server: NatsServer,
    redis_server: RedisServer,
    admin_redis: Any,
    drop: Path,
) -> None:
    """One replica, no state store: each start rebuilds the source's state from the broker
    (README "Recovery from the broker") with nothing but the shipped rights."""
    await fresh_stream(nats_server)
    if kind == "nats":
        broker = {
            "url": nats_server.url,
            "auth": {"username": "koprs-bridge", "password": BRIDGE_NATS},
        }
    else:
        broker = {
            "url": redis_server.url,
            "auth": {"username": "koprs-bridge", "password": BRIDGE_REDIS},
        }
    config = {"broker": broker, "sources": source(drop)}
    with recording_logs(logging.INFO) as logs:
        async with running_bridge(config) as (bridge, first):
            await first.wait_for(2)
            await bridge.started.wait()
            loop = bridge.loops["drop"]
            async with asyncio.timeout(60):
                await loop.wait_for_steps(loop.steps + 2)
        (drop / "a.txt").write_text("a2 changed while stopped")
        async with running_bridge(config) as (bridge, second):
            await second.wait_for(1)
            loop = bridge.loops["drop"]
            async with asyncio.timeout(60):
                await loop.wait_for_steps(loop.steps + 2)
    assert [(e.type.split(".")[-2], e.subject) for _, e in second.events] == [("modified", "a.txt")]
    assert "rebuilt the state of 2 live items" in logs.text()
    assert await acl_log(admin_redis) == []
    assert violations(nats_server) == []
    assert logs.warnings() == []


# -- a stream created beforehand --------------------------------------------------------------


async def test_precreated_stream_needs_only_stream_info(nats_precreated: NatsServer) -> None:
    sink_config = NatsSinkConfig(
        url=nats_precreated.url,
        auth=auth("koprs-bridge", BRIDGE_NATS),
        connect_timeout_s=1,
        ack_timeout_s=3,
    )
    await fresh_stream(nats_precreated)
    sink = NatsSink(sink_config)
    try:  # no stream yet: creating it is refused, and the error says which right is missing
        with pytest.raises(PublishError) as missing:
            await sink.connect()
    finally:
        await sink.aclose()
    assert "permissions violation" in str(missing.value).lower()
    assert f"$js.api.stream.create.{STREAM}".lower() in str(missing.value).lower()

    nc = await admin_nats(nats_precreated)
    try:
        await nc.jetstream().add_stream(sink_config.stream_config())
    finally:
        await nc.close()
    sink = NatsSink(sink_config)
    try:
        await sink.publish("files", object_events(["a", "b"]))
    finally:
        await sink.aclose()

    nc = await admin_nats(nats_precreated)
    try:  # the stream now differs from the config: the update is refused, clearly
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        await js.update_stream(info.config.evolve(duplicate_window=30.0))
    finally:
        await nc.close()
    sink = NatsSink(sink_config)
    try:
        with pytest.raises(PublishError) as differs:
            await sink.connect()
    finally:
        await sink.aclose()
    assert f"$js.api.stream.update.{STREAM}".lower() in str(differs.value).lower()
    assert "permissions violation" in str(differs.value).lower()


# -- consumers ----------------------------------------------------------------------------------


async def listed_keys(url: str, reader: AuthConfig, **options: Any) -> list[str]:
    """The keys a watch of source ``files`` lists (each acknowledged) before Synced."""
    keys: list[str] = []
    async with watch_nats(url, ["files"], auth=reader, fetch_timeout_s=1, **options) as watch:
        async with asyncio.timeout(30):
            async for item in watch:
                if isinstance(item, Synced):
                    break
                assert isinstance(item, Delivery)
                keys.append(item.envelope.key)
                await item.ack()
    return keys


async def test_nats_consumer_user_consumes_but_cannot_publish(nats_server: NatsServer) -> None:
    await fresh_stream(nats_server)
    sink = NatsSink(NatsSinkConfig(url=nats_server.url, auth=auth("koprs-bridge", BRIDGE_NATS)))
    try:
        await sink.publish("files", object_events(["a", "b", "c"]))
    finally:
        await sink.aclose()
    reader = auth("koprs-consumer", CONSUMER_NATS)

    for durable in ("operator", None):
        keys = await listed_keys(nats_server.url, reader, durable=durable)
        assert sorted(keys) == ["a", "b", "c"]

    errors: list[str] = []
    got_error = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        got_error.set()

    nc = await connect_nats(nats_server.url, auth=reader, error_cb=on_error)
    try:
        await nc.publish("koprs.external.files.forged", b"{}")
        await nc.flush()
        async with asyncio.timeout(30):
            await got_error.wait()
        with pytest.raises(nats.errors.TimeoutError):  # JetStream never sees it: no ack
            await nc.jetstream(timeout=1).publish("koprs.external.files.forged", b"{}")
    finally:
        await nc.close()
    assert "permissions violation for publish" in errors[0].lower()
    assert "koprs.external.files.forged" in errors[0].lower()


async def test_nats_consumer_without_msg_get_still_lists(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Rights granted before the watch asked the stream's leader where a list ends
    (``$JS.API.STREAM.MSG.GET``): the watch says what to allow and lists as before."""
    caplog.set_level(logging.WARNING, "bridge.consumer")
    users = nats_users(without=(f"$JS.API.STREAM.MSG.GET.{STREAM}",))
    with NatsServer(config=users) as server:
        sink = NatsSink(NatsSinkConfig(url=server.url, auth=auth("koprs-bridge", BRIDGE_NATS)))
        try:
            await sink.publish("files", object_events(["a", "b"]))
        finally:
            await sink.aclose()
        reader = auth("koprs-consumer", CONSUMER_NATS)
        keys = await listed_keys(server.url, reader, request_timeout_s=1)
    assert keys == ["a", "b"]
    assert f"allow $JS.API.STREAM.MSG.GET.{STREAM}" in caplog.text


async def test_redis_consumer_user_consumes_but_cannot_publish(
    redis_server: RedisServer, admin_redis: Any
) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_server.url, auth=auth("koprs-bridge", BRIDGE_REDIS)))
    try:
        await sink.publish("files", object_events(["a", "b", "c"]))
    finally:
        await sink.aclose()
    reader = auth("koprs-consumer", CONSUMER_REDIS)

    keys: list[str] = []
    async with watch_redis(
        redis_server.url, ["files"], group="operators", auth=reader, block_s=0.2
    ) as watch:
        async with asyncio.timeout(30):
            async for item in watch:
                if isinstance(item, Synced):
                    break
                assert isinstance(item, Delivery)
                keys.append(item.envelope.key)
    assert sorted(keys) == ["a", "b", "c"]
    sink = RedisSink(RedisSinkConfig(url=redis_server.url, auth=auth("koprs-bridge", BRIDGE_REDIS)))
    try:  # a live change, through the group: read and acknowledged
        await sink.publish("files", object_events(["d"], revision=2))
    finally:
        await sink.aclose()
    async with watch_redis(
        redis_server.url, ["files"], group="operators", auth=reader, block_s=0.2
    ) as watch:
        async with asyncio.timeout(30):
            async for item in watch:
                if isinstance(item, Delivery) and not item.initial:
                    assert item.envelope.key == "d"
                    await item.ack()
                    break
    assert await acl_log(admin_redis) == []

    client = redis_client(redis_server.url, auth=reader)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.xadd("koprs:external:files", {"event": json.dumps({})})
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.set("koprs:bridge:{files}:lease", "me|1")
    finally:
        await client.aclose()
    # the sink with the consumer's credentials: refused, and the error says so
    sink = RedisSink(RedisSinkConfig(url=redis_server.url, auth=reader))
    try:
        with pytest.raises(PublishError) as refused:
            await sink.publish("files", object_events(["e"], revision=3))
    finally:
        await sink.aclose()
    assert "NOPERM" in str(refused.value)
    assert "deploy/security/redis-acl.conf" in str(refused.value)
    assert CONSUMER_REDIS not in str(refused.value)
