"""Leases, fenced checkpoints and fair sharing (tests/ha/test_ha.py) on Redis Cluster and
Sentinel, and leader election across a failover of the Redis primary.

On a Cluster the election keys carry the prefix as one hash tag (``{koprs:bridge}:...``,
bridge/ha/keys.py ``prefix_for``): the heartbeat, acquisition and release scripts touch the
replicas key and many sources' leases at once, so they must all be in one slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bridge.connections import redis_client as make_client
from bridge.ha.keys import SourceKeys, prefix_for
from bridge.ha.leases import LeaseClient
from tests.ha import test_ha as single
from tests.support.clusters import RedisClusterSet, SentinelSet, redis_command

pytestmark = [pytest.mark.clusters, pytest.mark.servers]

for _name, _test in vars(single).items():
    if _name.startswith("test_") and callable(_test):
        globals()[_name] = _test


@pytest.fixture(params=["cluster", "sentinel"])
def redis_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"redis_{request.param}_url")
    return url


@pytest.fixture
async def redis_client(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_url)
    client.url = redis_url  # type: ignore[attr-defined]
    # the keys the imported tests look at directly: those the bridge uses on this topology
    monkeypatch.setattr(single, "PREFIX", prefix_for(client, single.PREFIX))
    yield client
    await client.aclose()


def test_cluster_election_keys_share_one_slot(redis_cluster: RedisClusterSet) -> None:
    from redis.asyncio.cluster import RedisCluster

    prefix = prefix_for(RedisCluster.__new__(RedisCluster))
    assert prefix == "{koprs:bridge}:"
    keys = [f"{prefix}replicas"]
    for source in ("files", "web", "x"):
        k = SourceKeys(source, prefix)
        keys += [k.lease, k.fence, k.state, k.meta, k.intent]
    port = redis_cluster.nodes[0].port
    assert len({redis_command(port, "CLUSTER", "KEYSLOT", key) for key in keys}) == 1


async def test_a_lease_survives_a_failover_of_the_redis_primary(
    request: pytest.FixtureRequest, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The lease and its fence are on the promoted replica (WAIT-free: a lease written just
    before the kill may be lost, the fence counter then still only grows on the new primary;
    the test waits for the replica to have it, as ``min-replicas`` would)."""
    servers: RedisClusterSet | SentinelSet = request.getfixturevalue(
        "redis_cluster" if "+cluster" in redis_url else "redis_sentinel"
    )
    a = LeaseClient(redis_client, "a", ttl_s=30, prefix=single.PREFIX)
    b = LeaseClient(redis_client, "b", ttl_s=30, prefix=single.PREFIX)
    lease = await a.acquire("src")
    assert lease is not None
    assert await redis_client.wait(1, 5000) >= 1  # on a replica
    if isinstance(servers, RedisClusterSet):
        await asyncio.to_thread(servers.fail_over, lease.keys.lease)
    else:
        await asyncio.to_thread(servers.fail_over)
    while True:  # a short outage: the client finds the promoted primary
        try:
            taken = await b.acquire("src")
            break
        except Exception:
            await asyncio.sleep(0.1)
    assert taken is None  # still a's
    assert await a.renew(lease)
    await asyncio.to_thread(servers.restore)
