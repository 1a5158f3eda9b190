"""The NATS sink on a 3-node cluster with an R3 stream: leader changes and dead nodes.

A publish that meets a fault (the stream leader killed: its acknowledgements time out until
a new leader is elected; the node the sink is connected to killed: it reconnects to another)
fails with PublishError, and the caller publishes the same batch again, with the same ids:
JetStream drops the copies that had landed (``Nats-Msg-Id``, ``duplicate_window``). A leader
election takes about two seconds here; the duplicate window (2 min by default) must exceed
the longest time a batch can take to go out again (README "Scaling").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import nats
import nats.errors
import pytest

from bridge.cloudevents import CloudEvent
from bridge.errors import PublishError
from bridge.sinks.nats import NatsSink
from tests.support.clusters import NatsCluster, kill
from tests.support.events import decode_nats, expected, fetch_all, nats_test_config, object_events
from tests.support.servers import NatsServer

pytestmark = [pytest.mark.clusters, pytest.mark.servers]


@pytest.fixture
async def sink(nats_cluster: NatsCluster, nats_cluster_url: str) -> AsyncIterator[NatsSink]:
    config = nats_test_config(nats_cluster_url, replicas=3, ack_timeout_s=1.0)
    made = NatsSink(config)
    await made.connect()
    # a new R3 stream elects its leader after the create call returned: a test that kills a
    # node at once would otherwise start on a stream not yet replicated everywhere
    await asyncio.to_thread(nats_cluster.wait_stream_healthy, config.stream)
    try:
        yield made
    finally:
        await made.aclose()
        await asyncio.to_thread(nats_cluster.ensure_running)
        nc = await nats.connect(nats_cluster_url.split(","))
        try:
            await nc.jetstream().delete_stream(config.stream)
        finally:
            await nc.close()


async def publish_retrying(sink: NatsSink, source: str, events: Sequence[CloudEvent]) -> int:
    """As the delivery loop does: the same batch again after a failure; the failures."""
    failures = 0
    while True:
        try:
            await sink.publish(source, events)
        except PublishError:
            failures += 1
            assert failures < 60, "the sink did not recover"
        else:
            return failures


async def stored(url: str, sink: NatsSink, count: int) -> list[dict[str, object]]:
    """The stream's messages; read again (bounded) when a node just back, still catching up,
    lets an API request time out."""
    for attempt in range(1, 6):
        nc = await nats.connect(url.split(","))
        try:
            js = nc.jetstream()
            info = await js.stream_info(sink.config.stream)
            assert info.state.messages == count
            prefix = f"{sink.config.subject_prefix}.>"
            msgs = await fetch_all(js, sink.config.stream, prefix, count)
            return [decode_nats(m) for m in msgs]
        except nats.errors.TimeoutError:
            if attempt == 5:
                raise
        finally:
            await nc.close()
    raise AssertionError("unreachable")


def connected_node(cluster: NatsCluster, sink: NatsSink) -> NatsServer:
    assert sink._nc is not None
    port = sink._nc.connected_url.port if sink._nc.connected_url else None
    return next(node for node in cluster.nodes if node.port == port)


async def test_the_stream_has_three_replicas(nats_cluster: NatsCluster, sink: NatsSink) -> None:
    await sink.publish("files", object_events(["a"]))
    await asyncio.to_thread(nats_cluster.wait_stream_current, sink.config.stream, 1)
    info = nats_cluster.stream_info(sink.config.stream)
    assert info is not None
    assert info["config"]["num_replicas"] == 3
    assert len(info["cluster"]["replicas"]) == 2


async def test_killed_stream_leader_loses_and_doubles_nothing(
    nats_cluster: NatsCluster, nats_cluster_url: str, sink: NatsSink
) -> None:
    first = object_events([f"k{i}" for i in range(50)])
    await sink.publish("files", first)
    leader = await asyncio.to_thread(nats_cluster.wait_stream_leader, sink.config.stream)

    second = object_events([f"k{i}" for i in range(50)], revision=2)
    send = asyncio.create_task(publish_retrying(sink, "files", second))
    await asyncio.to_thread(kill, leader)  # while the batch may be in flight
    await send
    await asyncio.to_thread(nats_cluster.wait_stream_leader, sink.config.stream, not_on=leader)
    third = object_events(["after"], revision=3)
    await publish_retrying(sink, "files", third)
    await publish_retrying(sink, "files", second)  # a late retry of an acknowledged batch

    await asyncio.to_thread(leader.start)  # back with its store: catches up
    await asyncio.to_thread(nats_cluster.wait_stream_current, sink.config.stream, 101)
    assert await stored(nats_cluster_url, sink, 101) == expected([*first, *second, *third])


async def test_the_node_the_sink_is_connected_to_dies_and_comes_back(
    nats_cluster: NatsCluster, nats_cluster_url: str, sink: NatsSink
) -> None:
    first = object_events(["a", "b"])
    await sink.publish("files", first)
    node = connected_node(nats_cluster, sink)
    await asyncio.to_thread(kill, node)

    second = object_events(["a", "c"], revision=2)
    await publish_retrying(sink, "files", second)  # on another node, after reconnecting
    assert connected_node(nats_cluster, sink) is not node

    await asyncio.to_thread(node.start)
    await asyncio.to_thread(nats_cluster.wait_stream_current, sink.config.stream, 4)
    assert await stored(nats_cluster_url, sink, 4) == expected([*first, *second])
