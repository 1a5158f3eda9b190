"""Redis Cluster / Sentinel URLs and NATS server lists: parsed, and explained when wrong.

``check`` (the config reader), ``tail --broker`` and the Redis sink use the same rules
(:mod:`bridge.redis_urls`). No servers here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from bridge.connections import redis_client, redis_tls_required
from bridge.errors import ConfigError
from bridge.redis_urls import RedisTarget, check_nats_urls, check_redis_url, parse_redis_url
from bridge.service.config import load_config
from bridge.sinks.redis_config import RedisSinkConfig
from bridge.tail import TailOptions


def test_cluster_url_is_parsed() -> None:
    target = parse_redis_url("rediss+cluster://bridge:p%40ss@n1:7000,n2:7001/")
    assert target == RedisTarget(
        "cluster", True, (("n1", 7000), ("n2", 7001)), username="bridge", password="p@ss"
    )
    assert "p@ss" not in repr(target)
    assert (target.username, target.password) == ("bridge", "p@ss")


def test_sentinel_url_is_parsed_with_service_and_db() -> None:
    target = parse_redis_url("redis+sentinel://s1:26379,s2:26380,s3:26381/mymaster/2")
    assert target.topology == "sentinel"
    assert not target.tls
    assert target.hosts == (("s1", 26379), ("s2", 26380), ("s3", 26381))
    assert (target.service, target.db) == ("mymaster", 2)
    assert parse_redis_url("redis+sentinel://s1:26379/mymaster").db == 0


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://s1:26379,s2:26379/", "missing service name"),
        ("redis+sentinel://s1:26379", "missing service name"),
        ("redis+sentinel://s1:26379/mymaster/x", "only a database number"),
        ("redis+cluster://n1:7000,redis://n2:7001/", "mixed schemes"),
        ("redis+cluster://n1:7000,n2/", "'n2' is not host:port"),
        ("redis+cluster://n1:7000/3", "database 0 only"),
        ("redis+cluster:///", "no host"),
        ("redis://n1:6379,n2:6379/0", "several hosts need a topology"),
        ("redis+mesh://n1:6379/", "must start with redis://"),
    ],
)
def test_wrong_redis_urls_are_explained(url: str, problem: str) -> None:
    found = check_redis_url(url)
    assert found is not None
    assert problem in found
    with pytest.raises(ConfigError, match=problem):
        parse_redis_url(url)


def test_good_redis_urls_pass() -> None:
    for url in (
        "redis://h:6379/0",
        "rediss://u:p@h:6380/1",
        "redis+cluster://h1:7000,h2:7001/",
        "rediss+cluster://h1:7000",
        "redis+sentinel://h1:26379,h2:26379/mymaster",
        "rediss+sentinel://h1:26379/mymaster/3",
    ):
        assert check_redis_url(url) is None, url


def test_nats_server_lists() -> None:
    assert check_nats_urls("nats://n1:4222,nats://n2:4222,tls://n3:4222") is None
    assert "mixed schemes" in (check_nats_urls("nats://n1:4222,redis://n2:6379") or "")
    assert "no scheme" in (check_nats_urls("nats://n1:4222,n2:4222") or "")


def _config(tmp_path: Path, broker: str, election: str | None = None) -> Path:
    text = f"broker: {{url: '{broker}'}}\n"
    if election is not None:
        text += f"leader_election: {{redis_url: '{election}'}}\n"
    text += f"sources: [{{name: a, interval: 1, local: {{path: '{tmp_path}'}}}}]\n"
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    return path


def test_config_takes_cluster_and_sentinel_urls(tmp_path: Path) -> None:
    config = load_config(
        _config(tmp_path, "redis+cluster://n1:7000,n2:7001/", "redis+sentinel://s1:26379/mymaster"),
        env={},
    )
    assert config.broker.kind == "redis"
    assert config.leader_election is not None
    config = load_config(_config(tmp_path, "rediss+sentinel://s1:26379/mymaster/1"), env={})
    assert config.broker.kind == "redis"


@pytest.mark.parametrize(
    ("broker", "election", "message"),
    [
        ("redis+sentinel://s1:26379/", None, "broker.url: missing service name"),
        ("nats://n1:4222,redis://n2:6379", None, "broker.url: mixed schemes"),
        ("nats://x", "redis+sentinel://s1:1", "leader_election.redis_url: missing service name"),
        ("nats://x", "redis+cluster://a:1,rediss+cluster://b:2/", "mixed schemes"),
    ],
)
def test_check_explains_wrong_cluster_urls(
    tmp_path: Path, broker: str, election: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, broker, election), env={})


def test_password_of_a_cluster_url_never_shows() -> None:
    with pytest.raises(ConfigError) as caught:
        RedisSinkConfig(url="redis+sentinel://u:hunter2@s1:26379/")
    assert "hunter2" not in str(caught.value)
    assert "missing service name" in str(caught.value)


def test_tail_broker_takes_cluster_urls_and_explains_wrong_ones() -> None:
    def options(broker: str) -> TailOptions:
        return TailOptions.from_args(
            config=None,
            broker=broker,
            sources=(),
            as_json=False,
            from_start=False,
            subject_prefix=None,
        )

    assert options("redis+cluster://n1:7000/").kind == "redis"
    with pytest.raises(ConfigError, match="--broker: missing service name"):
        options("redis+sentinel://s1:26379")


async def test_cluster_url_gives_a_cluster_client_with_tls_for_rediss() -> None:
    client = redis_client("rediss+cluster://127.0.0.1:7000/")
    try:
        assert isinstance(client, RedisCluster)
    finally:
        await client.aclose()
    assert redis_tls_required("rediss+cluster://h:1/", None)
    assert redis_tls_required("rediss+sentinel://h:1/m", None)
    assert not redis_tls_required("redis+sentinel://h:1/m", None)


async def test_rediss_topologies_use_the_bridges_tls_connection_classes() -> None:
    from bridge.connection_settings import TlsConfig
    from bridge.connections import TlsConnection, TlsSentinelConnection

    tls = TlsConfig(server_name="redis.internal")
    cluster = redis_client("rediss+cluster://127.0.0.1:7000/", tls)
    sentinel = redis_client("rediss+sentinel://127.0.0.1:26379/mymaster", tls)
    try:
        assert isinstance(cluster, RedisCluster)
        assert cluster.nodes_manager.connection_kwargs["connection_class"] is TlsConnection
        for node in cluster.nodes_manager.startup_nodes.values():
            assert node.connection_class is TlsConnection
        pool = sentinel.connection_pool
        assert pool.connection_class is TlsSentinelConnection
        assert pool.connection_kwargs["tls_config"] is tls
        for client in sentinel.sentinels.sentinels:
            assert client.connection_pool.connection_class is TlsConnection
    finally:
        await cluster.aclose()
        await sentinel.aclose()
