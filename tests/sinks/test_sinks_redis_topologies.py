"""The Redis Streams sink on Redis Cluster and Sentinel: one slot per source, failovers.

A failover is a short outage for the sink: the publish that meets it fails (PublishError),
the caller's retry publishes the batch again, and the dedup markers keep it free of
duplicates. With ``replicas: 2`` (the default on these topologies) a publish is acknowledged
only once a replica has it (``WAIT 1``), so the replica promoted after the primary is killed
has every acknowledged event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import pytest

from bridge.cloudevents import CloudEvent
from bridge.connections import redis_client
from bridge.errors import PublishError
from bridge.sinks.redis import RedisSink, RedisSinkConfig, items_key, marker_key
from bridge.subjects import redis_stream_key
from tests.support.clusters import RedisClusterSet, SentinelSet, redis_command
from tests.support.events import decode_redis, expected, object_events, xrange

pytestmark = [pytest.mark.clusters, pytest.mark.servers]


@pytest.mark.parametrize("source", ["x", "files", "app-config", "a_b", "S" * 64])
def test_a_sources_stream_markers_and_items_share_one_slot(
    redis_cluster: RedisClusterSet, source: str
) -> None:
    node = redis_cluster.nodes[0]
    stream = redis_stream_key(source)
    assert stream == f"koprs:external:{source}"  # the documented key, no hash tag of its own
    slots = {
        redis_command(node.port, "CLUSTER", "KEYSLOT", key)
        for key in (stream, items_key(source), marker_key(source, "some-event-id"))
    }
    assert len(slots) == 1


@dataclass
class Topology:
    name: str
    url: str
    fail_over: Callable[[str], object]
    """Kill the primary owning the key's slot; returns once a replica took over."""
    restore: Callable[[], None]


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Topology:
    if request.param == "cluster":
        cluster: RedisClusterSet = request.getfixturevalue("redis_cluster")
        url = request.getfixturevalue("redis_cluster_url")
        return Topology("cluster", url, cluster.fail_over, cluster.restore)
    sentinels: SentinelSet = request.getfixturevalue("redis_sentinel")
    url = request.getfixturevalue("redis_sentinel_url")
    return Topology("sentinel", url, lambda _key: sentinels.fail_over(), sentinels.restore)


@pytest.fixture
async def sink(topology: Topology) -> AsyncIterator[RedisSink]:
    made = RedisSink(RedisSinkConfig(url=topology.url, timeout_s=2.0))
    try:
        yield made
    finally:
        await made.aclose()


async def publish_retrying(sink: RedisSink, source: str, events: Sequence[CloudEvent]) -> int:
    """Publish as the bridge's delivery loop does: the same batch again after a failure.
    Returns the number of failed tries."""
    failures = 0
    while True:
        try:
            await sink.publish(source, events)
        except PublishError:
            failures += 1
            assert failures < 100, "the sink did not recover"
            await asyncio.sleep(0.1)
        else:
            return failures


async def stored(url: str, source: str) -> list[dict[str, object]]:
    client = redis_client(url)
    try:
        entries = await xrange(client, redis_stream_key(source))
        return [decode_redis(fields) for _id, fields in entries]
    finally:
        await client.aclose()


async def test_publish_and_read_back(topology: Topology, sink: RedisSink) -> None:
    events = object_events(["a", "b", "c"])
    await sink.publish("files", events)
    await sink.publish("files", events)  # again: dropped by the markers
    assert await stored(topology.url, "files") == expected(events)


async def test_killed_primary_loses_no_acknowledged_event_and_doubles_none(
    topology: Topology, sink: RedisSink
) -> None:
    first = object_events(["a", "b"])
    second = object_events(["c", "d"], revision=2)
    await sink.publish("files", first)  # acknowledged: a replica has it (WAIT 1)

    await asyncio.to_thread(topology.fail_over, redis_stream_key("files"))
    # the promoted primary has no replica yet: a write is not acknowledged before it has one
    with pytest.raises(PublishError):
        await sink.publish("files", second)
    await asyncio.to_thread(topology.restore)  # the old primary comes back as its replica

    await publish_retrying(sink, "files", [*first, *second])  # the delivery loop's retry
    assert await stored(topology.url, "files") == expected([*first, *second])


async def test_without_replicas_a_failover_is_a_short_outage(topology: Topology) -> None:
    sink = RedisSink(RedisSinkConfig(url=topology.url, timeout_s=2.0, replicas=1))
    try:
        first = object_events(["a"])
        await sink.publish("files", first)
        await asyncio.to_thread(topology.fail_over, redis_stream_key("files"))
        second = object_events(["b"], revision=2)
        await publish_retrying(sink, "files", second)  # no replica needed: goes on at once
        stored_now = await stored(topology.url, "files")
        assert stored_now[-1:] == expected(second)
        assert len({e["id"] for e in stored_now}) == len(stored_now)
    finally:
        await sink.aclose()
        await asyncio.to_thread(topology.restore)
