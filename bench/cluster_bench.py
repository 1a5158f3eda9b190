"""Clustered engines: publish throughput against the raw clients, and failover times.

``python -m bench.cluster_bench`` (``--help``). The servers of ``tests/support/clusters.py``:
a 3-node NATS cluster, a Redis Cluster (3 primaries + 3 replicas), a Sentinel set.

Rows:

* ``nats R3``: :class:`~bridge.sinks.nats.NatsSink` publishing ``--events`` events (batches of
  ``--batch``) to an R3 stream, against nats-py ``publish_async`` of the same messages,
  encoded beforehand, to the same cluster (then waiting for all acks). Ratio: bridge / raw.
* ``redis cluster``: :class:`~bridge.sinks.redis.RedisSink` (``replicas: 1``, and the default
  ``replicas: 2``, i.e. ``WAIT 1``) against a raw pipelined ``XADD`` of the same entries to the
  same stream through redis-py's cluster client. Ratio: bridge / raw.
* ``failover``: the time from SIGKILL of the node that matters (the NATS stream leader, the
  Redis primary owning the source's slot, the Sentinel primary) to the first publish the sink
  gets acknowledged again (publishing the same batch in a loop, as the delivery loop does),
  with ``replicas: 1`` on Redis (``replicas: 2`` waits for the killed node's return, as a
  promoted primary has no replica until then); the NATS node the sink is connected to; and
  the Cluster primary owning leader election's slot (the node started again at once) -> the
  next heartbeat counted with ``wait_replicas: 1`` (bridge/ha/replication.py).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import nats
import redis.exceptions

from bench.common import Row, format_table, write_rows
from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.connections import redis_client
from bridge.errors import PublishError, StateError
from bridge.events import Added
from bridge.ha.keys import SourceKeys, prefix_for
from bridge.ha.leases import LeaseClient
from bridge.ha.replication import Replication
from bridge.sinks.nats import NatsSink, NatsSinkConfig, _encode_binary
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.stores import StoredObject
from bridge.subjects import nats_subject, redis_stream_key
from tests.support.clusters import NatsCluster, RedisClusterSet, SentinelSet, kill
from tests.support.servers import RedisServer


def make_events(count: int, source: str = "bench", revision: int = 1) -> list[CloudEvent]:
    encoder = EventEncoder(source, "s3://bench/prefix")
    return [
        encoder.encode(
            Added(StoredObject(f"dir/object-{i:07d}.json", f"e{i}", 1234, None)), revision
        )
        for i in range(count)
    ]


def batches(events: Sequence[CloudEvent], size: int) -> list[Sequence[CloudEvent]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


async def timed(action: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


# -- throughput --------------------------------------------------------------------------------


async def nats_rows(cluster: NatsCluster, events: int, batch: int) -> list[Row]:
    stream = f"BENCH{int(time.time())}"
    config = NatsSinkConfig(
        url=cluster.url, stream=stream, subject_prefix=f"{stream.lower()}.ext", replicas=3
    )
    sink = NatsSink(config)
    await sink.connect()
    nc = await nats.connect(cluster.url.split(","))
    js = nc.jetstream()
    try:
        warm = make_events(batch, revision=0)
        await sink.publish("bench", warm)
        published = make_events(events, revision=1)

        async def bridge() -> None:
            for part in batches(published, batch):
                await sink.publish("bench", part)

        raw_events = make_events(events, revision=2)
        encoded = [
            (nats_subject("bench", e.subject, config.subject_prefix), *_encode_binary(e))
            for e in raw_events
        ]

        async def raw() -> None:
            for start in range(0, len(encoded), batch):
                acks = [
                    await js.publish_async(subject, body, headers=headers)
                    for subject, headers, body in encoded[start : start + batch]
                ]
                await asyncio.gather(*acks)

        bridge_s = await timed(bridge)
        raw_s = await timed(raw)
    finally:
        await sink.aclose()
        await js.delete_stream(stream)
        await nc.close()
    ratio = raw_s / bridge_s
    return [
        Row(
            "cluster",
            f"nats R3 publish {events} ev (batch {batch})",
            f"{events / bridge_s:,.0f} ev/s",
            f"raw publish_async {events / raw_s:,.0f} ev/s",
            ratio,
            "ratio >= 0.8",
            ratio >= 0.8,
            values={"bridge_s": bridge_s, "raw_s": raw_s},
        )
    ]


async def redis_rows(cluster: RedisClusterSet, events: int, batch: int) -> list[Row]:
    rows = []
    client = redis_client(cluster.url)
    try:
        entries = [
            {**headers, "data": body}
            for headers, body in (e.to_binary() for e in make_events(events, source="raw"))
        ]
        stream = redis_stream_key("raw")

        async def raw() -> None:  # the same fields, encoded beforehand, pipelined
            for start in range(0, len(entries), batch):
                pipe = client.pipeline(transaction=False)
                for fields in entries[start : start + batch]:
                    pipe.xadd(stream, fields, maxlen=100_000, approximate=True)  # type: ignore[arg-type]
                await pipe.execute()

        raw_s = await timed(raw)
        for replicas in (1, 2):
            sink = RedisSink(RedisSinkConfig(url=cluster.url, replicas=replicas))
            published = make_events(events, source=f"bench{replicas}")
            try:
                await sink.publish(f"bench{replicas}", make_events(10, f"bench{replicas}", 0))

                async def bridge(
                    sink: RedisSink = sink,
                    published: list[CloudEvent] = published,
                    r: int = replicas,
                ) -> None:
                    for part in batches(published, batch):
                        await sink.publish(f"bench{r}", part)

                bridge_s = await timed(bridge)
            finally:
                await sink.aclose()
            ratio = raw_s / bridge_s
            rows.append(
                Row(
                    "cluster",
                    f"redis cluster sink replicas={replicas} {events} ev (batch {batch})",
                    f"{events / bridge_s:,.0f} ev/s",
                    f"raw pipelined XADD {events / raw_s:,.0f} ev/s",
                    ratio,
                    "ratio >= 0.5" if replicas == 1 else "",
                    ratio >= 0.5 if replicas == 1 else None,
                    note="WAIT 1 after each transaction" if replicas == 2 else "",
                    values={"bridge_s": bridge_s, "raw_s": raw_s},
                )
            )
    finally:
        await client.aclose()
    return rows


# -- failover ----------------------------------------------------------------------------------


async def publish_until_acknowledged(
    publish: Callable[[], Awaitable[None]], timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await publish()
            return
        except PublishError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def failover_rows(
    nats_cluster: NatsCluster, redis_cluster: RedisClusterSet, sentinels: SentinelSet
) -> list[Row]:
    rows = []
    # NATS: the stream leader
    stream = f"FAIL{int(time.time())}"
    sink = NatsSink(
        NatsSinkConfig(
            url=nats_cluster.url, stream=stream, subject_prefix="fail.ext", replicas=3,
            ack_timeout_s=1.0,
        )
    )  # fmt: skip
    await sink.connect()
    await sink.publish("bench", make_events(1))
    leader = await asyncio.to_thread(nats_cluster.wait_stream_leader, stream)
    events = make_events(1, revision=2)
    killed = time.perf_counter()
    await asyncio.to_thread(kill, leader)
    await publish_until_acknowledged(lambda: sink.publish("bench", events))
    rows.append(_failover_row("nats stream leader killed", time.perf_counter() - killed))
    await asyncio.to_thread(nats_cluster.ensure_running)
    await asyncio.to_thread(nats_cluster.wait_stream_healthy, stream)

    # NATS: the node the sink is connected to (it reconnects to another)
    connected = sink._nc.connected_url if sink._nc is not None else None
    node = next(n for n in nats_cluster.nodes if connected and n.port == connected.port)
    leading = await asyncio.to_thread(nats_cluster.stream_leader, stream) is node
    events = make_events(1, revision=3)
    killed = time.perf_counter()
    await asyncio.to_thread(kill, node)
    await publish_until_acknowledged(lambda: sink.publish("bench", events))
    row = _failover_row("nats node of the sink killed", time.perf_counter() - killed)
    row.note = (
        "that node led the stream too (a stream leader election on top of the reconnection)"
        if leading
        else "another node led the stream (the reconnection alone)"
    )
    rows.append(row)
    await sink.aclose()
    await asyncio.to_thread(nats_cluster.ensure_running)

    # Redis Cluster: the primary of the source's slot; Sentinel: the primary
    for name, url, fail, restore in (
        (
            "redis cluster primary of the slot killed",
            redis_cluster.url,
            lambda: kill(redis_cluster.primary_for(redis_stream_key("bench"))),
            redis_cluster.restore,
        ),
        (
            "sentinel primary killed",
            sentinels.url,
            lambda: kill(_must(sentinels.current_primary())),
            sentinels.restore,
        ),
    ):
        redis_sink = RedisSink(RedisSinkConfig(url=url, replicas=1, timeout_s=1.0))
        await redis_sink.publish("bench", make_events(1))
        events = make_events(1, revision=3)
        killed = time.perf_counter()
        await asyncio.to_thread(fail)
        await publish_until_acknowledged(lambda s=redis_sink, e=events: s.publish("bench", e))  # type: ignore[misc]
        rows.append(_failover_row(name, time.perf_counter() - killed))
        await redis_sink.aclose()
        await asyncio.to_thread(restore)
    rows.append(await election_failover_row(redis_cluster))
    return rows


async def election_failover_row(cluster: RedisClusterSet) -> Row:
    """SIGKILL of the Cluster primary owning the election's slot, the node started again at
    once (it rejoins as the promoted one's replica) -> the next heartbeat that counts
    (``wait_replicas: 1``: the promoted primary needs its replica back)."""
    client = redis_client(cluster.url, socket_timeout=1, socket_connect_timeout=1)
    prefix = prefix_for(client)
    leases = LeaseClient(client, "bench", ttl_s=30, prefix=prefix, replication=Replication(1, 0.5))
    try:
        await leases.acquire_many(["bench"])
        primary = cluster.primary_for(SourceKeys("bench", prefix).lease)
        killed = time.perf_counter()
        await asyncio.to_thread(kill, primary)
        restarted = asyncio.create_task(asyncio.to_thread(primary.start))
        deadline = time.monotonic() + 60
        while True:
            try:
                await leases.heartbeat(["bench"])
                break
            except (StateError, redis.exceptions.RedisError, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        seconds = time.perf_counter() - killed
        await restarted
    finally:
        await client.aclose()
    await asyncio.to_thread(cluster.restore)
    return Row(
        "cluster",
        "failover: election primary killed (restarted at once)",
        f"{seconds:.2f} s to the next counted heartbeat (WAIT 1)",
        "test settings: node timeout 1 s",
        None,
        "",
        None,
        values={"seconds": seconds},
    )


def _must(value: RedisServer | None) -> RedisServer:
    assert value is not None
    return value


def _failover_row(name: str, seconds: float) -> Row:
    return Row(
        "cluster",
        f"failover: {name}",
        f"{seconds:.2f} s to the next acknowledged publish",
        "test settings: node timeout / down-after 1 s",
        None,
        "",
        None,
        values={"seconds": seconds},
    )


async def run(events: int, batch: int) -> list[Row]:
    nats_cluster, redis_cluster, sentinels = NatsCluster(), RedisClusterSet(), SentinelSet()
    try:
        for servers in (nats_cluster, redis_cluster, sentinels):
            await asyncio.to_thread(servers.start)
        rows = await nats_rows(nats_cluster, events, batch)
        rows += await redis_rows(redis_cluster, events, batch)
        rows += await failover_rows(nats_cluster, redis_cluster, sentinels)
        return rows
    finally:
        for servers in (nats_cluster, redis_cluster, sentinels):
            servers.close()


def run_rows(*, events: int = 20_000, batch: int = 1000) -> list[Row]:
    """The rows of ``make bench`` (bench/run.py runs this in a child process)."""
    return asyncio.run(run(events, batch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.events, args.batch))
    print(format_table(rows))
    if args.json:
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
