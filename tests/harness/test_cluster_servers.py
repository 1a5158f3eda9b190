"""The clustered test servers themselves: they form, fail over and come back."""

from __future__ import annotations

from tests.support.clusters import NatsCluster, RedisClusterSet, SentinelSet, redis_command


def test_nats_cluster_has_three_routed_nodes(
    nats_cluster: NatsCluster, nats_cluster_url: str
) -> None:
    assert nats_cluster_url.count("nats://") == 3
    for node in nats_cluster.nodes:
        assert node.running


def test_redis_cluster_fails_over_and_comes_back(
    redis_cluster: RedisClusterSet, redis_cluster_url: str
) -> None:
    primary = redis_cluster.primary_for("koprs:external:x")
    assert len(redis_cluster.replicas_of(primary)) == 1
    old, new = redis_cluster.fail_over("koprs:external:x")
    assert old is primary
    assert new is not old
    assert not old.running
    redis_cluster.restore()
    assert old.running
    assert redis_cluster.primary_for("koprs:external:x") is new


def test_sentinel_fails_over_and_comes_back(
    redis_sentinel: SentinelSet, redis_sentinel_url: str
) -> None:
    old, new = redis_sentinel.fail_over()
    assert new is not old
    redis_command(new.port, "SET", "k", "v")
    redis_sentinel.restore()
    assert redis_sentinel.current_primary() is new
