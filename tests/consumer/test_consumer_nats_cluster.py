"""The NATS consumer's behaviour tests (tests/test_consumer_nats.py) on the 3-node cluster
with an R3 stream, and the watch across a stream leader change and a dead node.

The imported test functions run here with the sink's config pointing at every node of the
cluster (``nats://n1,nats://n2,nats://n3``, ``replicas: 3``); the tests that restart the single
test server are left out (the failovers below replace them).
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from collections.abc import AsyncIterator

import nats
import nats.errors
import nats.js
import nats.js.errors
import pytest

from bridge.events import Added, Modified
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from tests.consumer import test_consumer_nats as single
from tests.support.clusters import NatsCluster, kill
from tests.support.events import nats_test_config

pytestmark = [pytest.mark.clusters, pytest.mark.servers]

_SINGLE_SERVER = {"nats_server", "nats_url"}
_LEFT_OUT = {
    # connects to config.url with raw nats-py, which takes one URL, not a comma-separated list
    "test_stream_created_after_the_watch_started",
    # makes an R1 stream itself: the R3 sink scales it up, and its first publish times out
    # while the new replicas catch up (retried later by the bridge; no retry in this test)
    "test_lists_again_when_messages_were_lost_meanwhile",
}

for _name, _test in vars(single).items():
    if (
        _name.startswith("test_")
        and callable(_test)
        and _name not in _LEFT_OUT
        and not _SINGLE_SERVER & set(inspect.signature(_test).parameters)
    ):
        globals()[_name] = _test


@pytest.fixture
async def sink(
    nats_cluster: NatsCluster, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> AsyncIterator[NatsSink]:
    made = NatsSink(config)
    await made.connect()
    # a new R3 stream elects its leader after the create call returned: until then a raw
    # publish finds no responder (the sink retries, the tests' raw publishes do not)
    await asyncio.to_thread(nats_cluster.wait_stream_healthy, config.stream)
    try:
        yield made
    finally:
        await made.aclose()
        # a node killed by the test may still be catching up: the stream's name is the test's
        # own, so a stream left behind after a while of trying harms no other test
        await asyncio.to_thread(nats_cluster.ensure_running)
        for _ in range(10):
            try:
                await js.delete_stream(config.stream)
                break
            except (nats.errors.Error, nats.js.errors.Error):
                await asyncio.sleep(1)


@pytest.fixture
def config(nats_cluster_url: str) -> NatsSinkConfig:
    return nats_test_config(nats_cluster_url, replicas=3)


@pytest.fixture
async def js(nats_cluster_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(
        nats_cluster_url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.05
    )
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.mark.parametrize("fault", ["stream-leader", "connected-node"])
@pytest.mark.parametrize("durable", [None, "ops"])
async def test_watch_goes_on_across_a_node_failure(
    nats_cluster: NatsCluster,
    sink: NatsSink,
    config: NatsSinkConfig,
    durable: str | None,
    fault: str,
) -> None:
    """Nothing lost, nothing acknowledged delivered again, no second list."""
    ev = single.Events()
    a, b = await ev.publish(sink, ev.make(Added, ["a", "b"]))
    w = single.watch(config, durable=durable, ack_wait_s=1.0)
    async with single.collecting(w) as seen:
        await seen.wait_for(lambda s: s.synced == 1)
        if fault == "stream-leader":
            victim = await asyncio.to_thread(nats_cluster.wait_stream_leader, config.stream)
        else:
            assert w._nc is not None
            assert w._nc.connected_url is not None
            port = w._nc.connected_url.port
            victim = next(node for node in nats_cluster.nodes if node.port == port)
        await asyncio.to_thread(kill, victim)
        c = ev.make(Added, ["c"])
        await single.publish_retrying(sink, c)  # on the two nodes left
        await asyncio.to_thread(victim.start)  # back with its store
        await seen.wait_for(lambda s: c[0].id in s.ids)
        d = ev.make(Modified, ["a"], etag="e2")
        await single.publish_retrying(sink, d)
        await seen.wait_for(lambda s: d[0].id in s.ids)
    assert seen.synced == 1
    assert Counter(seen.ids) == Counter([a.id, b.id, c[0].id, d[0].id])
    assert len(seen.deliveries) == 4
