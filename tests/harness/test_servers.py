"""The test servers themselves: they answer, and they come back after an outage."""

from __future__ import annotations

import uuid

import nats
import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.support import containers
from tests.support.servers import (
    LOOPBACK,
    NatsServer,
    RedisServer,
    S3Server,
    ServerError,
    free_port,
)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_free_port_is_on_loopback_and_not_repeated() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert all(1024 <= port <= 65535 for port in ports)


@pytest.mark.parametrize("switch", ["1", "0", ""])
def test_containers_switch_picks_the_kind_of_server(
    monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    monkeypatch.setenv("KOPRS_TEST_CONTAINERS", switch)
    made = [containers.redis_server(), containers.nats_server(), containers.s3_server()]
    try:
        kinds = [type(server) for server in made]
        if switch == "1":
            assert kinds == [
                containers.RedisContainer,
                containers.NatsContainer,
                containers.S3Container,
            ]
            assert all(isinstance(s, containers.ContainerServer) for s in made)
        else:
            assert kinds == [RedisServer, NatsServer, S3Server]
        assert all(not server.running for server in made)  # nothing started yet
    finally:
        for server in made:
            server.close()


async def test_redis_ping_set_get_and_restart(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://{LOOPBACK}:{redis_server.port}/0"
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping()
        await client.set("greeting", b"hello")
        assert await client.get("greeting") == b"hello"
    finally:
        await client.aclose()

    port = redis_server.port
    redis_server.stop()
    assert not redis_server.running
    redis_server.start()
    assert redis_server.port == port

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping()
        assert await client.get("greeting") is None  # no persistence: a restart starts empty
    finally:
        await client.aclose()


async def test_redis_pause_and_resume(redis_server: RedisServer, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=0.3, retry_on_timeout=False)
    try:
        assert await client.ping()
        redis_server.pause()
        try:
            with pytest.raises(RedisTimeoutError):
                await client.ping()
        finally:
            redis_server.resume()
    finally:
        await client.aclose()

    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


def test_redis_url_starts_empty(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.running
    assert redis_url.startswith(f"redis://{LOOPBACK}:")


async def test_nats_jetstream_message_survives_restart(
    nats_server: NatsServer, nats_url: str
) -> None:
    assert nats_url == f"nats://{LOOPBACK}:{nats_server.port}"
    stream = _unique("restart").upper()
    subject = f"{stream.lower()}.events"

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject])
        ack = await js.publish(subject, b"payload-1")
        assert ack.stream == stream
        assert ack.seq == 1
    finally:
        await nc.close()

    nats_server.stop()
    nats_server.start()

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages == 1
        msg = await js.get_msg(stream, seq=1)
        assert msg.data == b"payload-1"
        assert msg.subject == subject
        await js.delete_stream(stream)
    finally:
        await nc.close()


def test_s3_bucket_put_and_list(s3_server: S3Server) -> None:
    bucket = _unique("koprs-test")
    s3_server.create_bucket(bucket)
    client = s3_server.client()
    for index in range(3):
        client.put_object(Bucket=bucket, Key=f"dir/object-{index}.json", Body=b"{}")

    listing = client.list_objects_v2(Bucket=bucket, Prefix="dir/")
    keys = sorted(item["Key"] for item in listing.get("Contents", []))
    assert keys == ["dir/object-0.json", "dir/object-1.json", "dir/object-2.json"]


def test_s3_bucket_fixture_gives_an_empty_bucket(s3_server: S3Server, s3_bucket: str) -> None:
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket)
    assert listing["KeyCount"] == 0
    assert s3_server.endpoint_url == f"http://{LOOPBACK}:{s3_server.port}"
    assert (s3_server.access_key, s3_server.region) == ("testing", "us-east-1")


def test_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServerError, match="apt-get install -y redis-server"):
        RedisServer.binary()


def test_s3_reset_forgets_every_bucket(s3_server: S3Server) -> None:
    s3_server.create_bucket(_unique("koprs-reset"))
    s3_server.reset()
    assert s3_server.client().list_buckets()["Buckets"] == []
