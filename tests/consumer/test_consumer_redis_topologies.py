"""The Redis consumer's behaviour tests (tests/test_consumer_redis.py) on Redis Cluster and
Sentinel: list-then-watch, groups, claims, naks, decode errors, lost streams.

The same test functions run here with ``redis_url`` pointing at each topology (and the
helpers' client made by :func:`bridge.connections.redis_client`, a cluster client for
``redis+cluster://``). On a Cluster every source's stream is in its own slot: the watch reads
each with a command of its own (bridge/consumer/redis_cluster_reads.py). The tests that
restart the single test server are left out here (a failover is tested below instead).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from bridge.connections import redis_client
from bridge.consumer import watch_redis
from bridge.consumer.base import Delivery
from bridge.events import Modified
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from tests.consumer import test_consumer_redis as single
from tests.support.clusters import RedisClusterSet, SentinelSet

pytestmark = [pytest.mark.clusters, pytest.mark.servers]

_RESTARTS_THE_SERVER = {"redis_server"}

for _name, _test in vars(single).items():
    if (
        _name.startswith("test_")
        and callable(_test)
        and not _RESTARTS_THE_SERVER & set(inspect.signature(_test).parameters)
    ):
        globals()[_name] = _test

open_watch = single.open_watch
sink = single.sink


@pytest.fixture(params=["cluster", "sentinel"])
def redis_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"redis_{request.param}_url")
    return url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    made = redis_client(redis_url)
    if isinstance(made, RedisCluster):  # CLIENT LIST of every node, as one list
        every_node = made.client_list

        async def client_list() -> list[dict[str, str]]:
            per_node = await every_node(target_nodes=RedisCluster.ALL_NODES)
            return [entry for entries in per_node.values() for entry in entries]

        made.client_list = client_list
    try:
        yield made
    finally:
        await made.aclose()


@pytest.mark.parametrize("group", [None, "ops"])
async def test_watch_goes_on_across_a_failover(
    request: pytest.FixtureRequest, redis_url: str, group: str | None
) -> None:
    topology = "cluster" if "+cluster" in redis_url else "sentinel"
    servers: RedisClusterSet | SentinelSet = request.getfixturevalue(f"redis_{topology}")
    publisher = RedisSink(RedisSinkConfig(url=redis_url, replicas=2, timeout_s=2.0))
    watch = watch_redis(redis_url, ["files", "web"], group=group, block_s=0.5, retry_max_s=0.2)
    try:
        await publisher.publish("files", single.events(["a"]))
        first = await single.take(watch, 2)
        assert single.seen(first) == [("files", "added", "a", "e1", True), "synced"]
        await single.settle(first)

        if isinstance(servers, RedisClusterSet):
            await asyncio.to_thread(servers.fail_over, "koprs:external:files")
        else:
            await asyncio.to_thread(servers.fail_over)
        await asyncio.to_thread(servers.restore)

        await publisher.publish("files", single.events(["a"], Modified, etag="e2"))
        await publisher.publish("web", single.events(["w"], source="web"))
        live = await single.take(watch, 2)
        assert sorted(single.seen(live), key=str) == [
            ("files", "modified", "a", "e2", False),
            ("web", "added", "w", "e1", False),
        ]
        assert all(isinstance(item, Delivery) for item in live)
        await single.settle(live)
    finally:
        await watch.aclose()
        await publisher.aclose()
