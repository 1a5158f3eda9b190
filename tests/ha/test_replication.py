"""Leader election and checkpoint writes wait for replicas (bridge/ha/replication.py).

A write of leases or checkpoints counts only once ``leader_election.wait_replicas`` replicas
acknowledged it (``WAIT`` on the same connection). Where no replica can acknowledge it (a
single server asked for one, a Sentinel set or Cluster shard whose replica is down), the
write is reported as not replicated, never taken as done.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bridge.connections import redis_client as make_client
from bridge.errors import StateError
from bridge.ha.checkpoints import RedisStateStore
from bridge.ha.keys import SourceKeys, prefix_for
from bridge.ha.leases import Lease, LeaseClient
from bridge.ha.replication import NotReplicated, Replication
from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from bridge.state import Intent
from tests.ha.test_ha import config as single_config
from tests.support.clusters import RedisClusterSet, SentinelSet

PREFIX = "koprs:bridge:"
ONE_REPLICA = Replication(replicas=1, timeout_s=0.05)


async def test_without_a_replica_an_acquisition_is_reported_not_replicated(
    redis_client: aioredis.Redis,
) -> None:
    leases = LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX, replication=ONE_REPLICA)
    with pytest.raises(NotReplicated) as caught:
        await leases.acquire_many(["src"])
    message = str(caught.value)
    assert "acknowledged by 0 of the 1 replica(s)" in message
    assert "leader_election.wait_replicas" in message
    assert "replica 'a'" in message
    assert isinstance(caught.value, StateError)  # a round that failed, as with Redis down
    # written on the primary all the same: the next round takes it again with a new fence
    assert await redis_client.get(SourceKeys("src", PREFIX).lease) == b"a|1"


async def test_without_a_replica_a_renewal_does_not_extend_the_membership(
    redis_client: aioredis.Redis,
) -> None:
    counted = LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX)
    await counted.heartbeat(["src"])
    deadline = counted.membership.deadline
    waiting = LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX, replication=ONE_REPLICA)
    waiting.membership = counted.membership
    with pytest.raises(NotReplicated, match="membership renewal of replica 'a'"):
        await waiting.heartbeat(["src"])
    assert counted.membership.deadline == deadline


async def test_without_a_replica_a_lease_taken_alone_is_not_renewed(
    redis_client: aioredis.Redis,
) -> None:
    lease = await LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX).acquire("src")
    assert lease is not None
    deadline = lease.deadline
    waiting = LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX, replication=ONE_REPLICA)
    assert await waiting.renew(lease)  # still within its TTL: retried, not lost
    assert lease.deadline == deadline


async def test_without_a_replica_a_checkpoint_write_is_reported_not_replicated(
    redis_client: aioredis.Redis,
) -> None:
    lease = await LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX).acquire("src")
    assert lease is not None
    store = RedisStateStore(redis_client, {"src": lease}, ONE_REPLICA)
    with pytest.raises(NotReplicated, match="checkpoint write of source 'src'"):
        await store.commit("src", 1, {"k": "v1"})
    with pytest.raises(NotReplicated, match="checkpoint write of source 'src'"):
        await store.begin("src", Intent(1, {"k": "v2"}))


async def test_a_fenced_write_is_still_refused_as_fenced(redis_client: aioredis.Redis) -> None:
    a = LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX)
    lease = await a.acquire("src")
    assert lease is not None
    stale = Lease(lease.keys, "a", lease.fence - 1, 5, deadline=lease.deadline)
    store = RedisStateStore(redis_client, {"src": stale}, ONE_REPLICA)
    with pytest.raises(StateError, match="no longer holds the lease"):
        await store.commit("src", 1, {"k": "v1"})


async def test_a_bridge_asked_for_a_replica_it_cannot_have_leads_nothing_and_says_why(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``wait_replicas: 1`` on a server without replicas: no acquisition counts, so no source
    is led (never two leaders after a failover), and the log says what is missing."""
    raw = single_config(tmp_path, ["files"], redis_url)
    raw["leader_election"]["wait_replicas"] = 1
    bridge = Bridge(parse_config(raw, env={}), sink=MemorySink("r1"), replica="r1")
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="bridge.ha")
    task = asyncio.create_task(bridge.run(stop))
    assert bridge.coordinator is not None
    try:
        await bridge.coordinator.wait_for_rounds(3)
        assert bridge.coordinator.led == {}
    finally:
        stop.set()
        await task
    assert any(
        "leader election round failed" in r.getMessage()
        and "acknowledged by 0 of the 1 replica(s) leader_election.wait_replicas asks for"
        in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_wait_replicas_defaults_to_one_on_clustered_urls_and_zero_on_a_single_server() -> None:
    def election(url: str, **more: object) -> int:
        raw = {
            "broker": {"url": "nats://127.0.0.1:4222"},
            "leader_election": {"redis_url": url, **more},
            "sources": [{"name": "web", "interval": 1, "http": {"url": "http://127.0.0.1:1/"}}],
        }
        config = parse_config(raw, env={})
        assert config.leader_election is not None
        return config.leader_election.replicas_to_wait_for

    assert election("redis://127.0.0.1:6379/0") == 0
    assert election("redis+cluster://127.0.0.1:7000/") == 1
    assert election("redis+sentinel://127.0.0.1:26379/mymaster") == 1
    assert election("redis+sentinel://127.0.0.1:26379/mymaster", wait_replicas=0) == 0
    assert election("redis://127.0.0.1:6379/0", wait_replicas=2) == 2


# -- on the clustered topologies -----------------------------------------------------------


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> tuple[str, RedisClusterSet | SentinelSet]:
    url: str = request.getfixturevalue(f"redis_{request.param}_url")
    servers: RedisClusterSet | SentinelSet = request.getfixturevalue(f"redis_{request.param}")
    return url, servers


@pytest.mark.clusters
@pytest.mark.servers
async def test_on_a_topology_writes_reach_a_replica_and_not_without_one(
    topology: tuple[str, RedisClusterSet | SentinelSet],
) -> None:
    """With the replica up, every write counts (and a script the promoted or restarted
    primary does not know is sent whole); with the replica of the election's primary
    stopped, the same writes are reported as not replicated."""
    url, servers = topology
    client = make_client(url, socket_timeout=2, socket_connect_timeout=2)
    replication = Replication(replicas=1, timeout_s=0.5)
    try:
        prefix = prefix_for(client, PREFIX)
        leases = LeaseClient(client, "a", ttl_s=5, prefix=prefix, replication=replication)
        primary = (
            servers.primary_for(SourceKeys("src", prefix).lease)
            if isinstance(servers, RedisClusterSet)
            else servers.current_primary()
        )
        assert primary is not None
        await asyncio.to_thread(_flush_scripts, primary.port)  # as on a promoted replica
        [lease] = await leases.acquire_many(["src"])
        await leases.heartbeat(["src"])
        store = RedisStateStore(client, {"src": lease}, replication)
        await store.commit("src", 1, {"k": "v1"})

        replicas = (
            servers.replicas_of(primary)
            if isinstance(servers, RedisClusterSet)
            else [node for node in servers.data_nodes if node is not primary]
        )  # after a failover (an earlier test) the set's first replica may be the primary
        for replica in replicas:
            await asyncio.to_thread(replica.stop)
        with pytest.raises(NotReplicated, match="acknowledged by 0 of the 1 replica"):
            await leases.heartbeat(["src"])
        with pytest.raises(NotReplicated):
            await store.commit("src", 2, {"k": "v2"})
    finally:
        await client.aclose()
        await asyncio.to_thread(servers.restore)


def _flush_scripts(port: int) -> None:
    from tests.support.clusters import redis_command

    redis_command(port, "SCRIPT", "FLUSH")
