"""Throughput of the bridge's publish path against the raw client libraries.

Run ``.venv/bin/python bench/publish_bench.py`` (``--help`` for options). It starts its own
``nats-server`` and ``redis-server`` on free loopback ports (``tests/servers.py``), then measures
events per second of:

* bridge: ``EventEncoder.encode`` of every event, then ``NatsSink.publish`` /
  ``RedisSink.publish`` per batch (acknowledgements awaited);
* raw: the same messages, encoded beforehand, sent with nats-py ``js.publish_async`` and the
  same headers (then ``publish_async_completed``), or with a redis-py pipeline of ``XADD``
  with the same fields.

for events whose data is about 300 bytes and 10 KiB, in batches of 100 and 1000. Every event
has a new id, so nothing is dropped as a duplicate. The ratio bridge/raw should be >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import redis.asyncio
from nats.js import JetStreamContext

from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.events import Added, ExternalEvent, Modified
from bridge.sinks import Sink
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.http import HttpResource
from bridge.subjects import nats_subject, redis_stream_key
from tests.servers import NatsServer, RedisServer

T = TypeVar("T")
SOURCE = "bench"
ITEMS = 1000


@dataclass(frozen=True)
class Case:
    broker: str
    data_bytes: int
    batch: int
    events: int


@dataclass
class Result:
    case: Case
    bridge_eps: float
    raw_eps: float

    @property
    def ratio(self) -> float:
        return self.bridge_eps / self.raw_eps


def make_resources(data_bytes: int, count: int) -> list[ExternalEvent[HttpResource]]:
    """HTTP resources whose CloudEvent ``data`` is about ``data_bytes`` long."""
    overhead = 260  # url, status, digest, ... of the data object without the body
    body_len = max(0, data_bytes - overhead)
    events: list[ExternalEvent[HttpResource]] = []
    for i in range(count):
        text = (f"{i:08d}" + "x" * body_len)[:body_len].encode()
        resource = HttpResource(
            url=f"https://example.test/items/{i % ITEMS}",
            status=200,
            body=text,
            etag=f'"e{i}"',
            content_type="text/plain",
        )
        events.append(Added(resource) if i < ITEMS else Modified(resource))
    return events


class Encoder:
    """Encodes with a new revision per call so that every round has new event ids."""

    def __init__(self) -> None:
        self.encoder = EventEncoder(SOURCE, "https://example.test/items")
        self.revision = itertools.count(1)

    def encode(self, events: Sequence[ExternalEvent[Any]]) -> list[CloudEvent]:
        revision = next(self.revision)
        return [self.encoder.encode(event, revision) for event in events]


async def timed(run: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await run()
    return time.perf_counter() - started


def batches(events: Sequence[T], size: int) -> list[Sequence[T]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


async def bridge_publish(
    sink: Sink, encoder: Encoder, resources: Sequence[ExternalEvent[Any]], batch: int
) -> None:
    """The bridge's path: encode each batch, publish it, wait for the acks."""
    for chunk in batches(resources, batch):
        await sink.publish(SOURCE, encoder.encode(chunk))


NatsMessage = tuple[str, dict[str, str], bytes]


def nats_messages(events: Sequence[CloudEvent]) -> list[NatsMessage]:
    messages = []
    for event in events:
        headers, body = event.to_binary()
        headers["Nats-Msg-Id"] = event.id
        messages.append((nats_subject(SOURCE, event.subject), headers, body))
    return messages


async def raw_nats(js: JetStreamContext, messages: Sequence[NatsMessage], batch: int) -> None:
    """Pre-encoded messages through nats-py's own pipelined JetStream publish."""
    for chunk in batches(messages, batch):
        for subject, headers, body in chunk:
            await js.publish_async(subject, body, headers=headers)
        await js.publish_async_completed()


RedisFields = dict[Any, Any]  # what redis-py's xadd() accepts


def redis_entries(events: Sequence[CloudEvent]) -> list[RedisFields]:
    entries = []
    for event in events:
        headers, body = event.to_binary()
        fields: RedisFields = {}
        fields.update(headers)
        fields["data"] = body
        entries.append(fields)
    return entries


async def raw_redis(
    client: redis.asyncio.Redis, stream: str, entries: Sequence[RedisFields], batch: int
) -> None:
    """Pre-encoded entries as one pipeline of ``XADD MAXLEN ~`` per batch."""
    for chunk in batches(entries, batch):
        pipe = client.pipeline(transaction=False)
        for fields in chunk:
            pipe.xadd(stream, fields, maxlen=100_000, approximate=True)
        await pipe.execute()


async def bench_nats(url: str, case: Case, rounds: int) -> Result:
    sink = NatsSink(NatsSinkConfig(url=url, stream="BENCH", max_msgs_per_subject=4))
    await sink.connect()
    nc = await nats.connect(url)
    js = nc.jetstream()
    encoder = Encoder()
    resources = make_resources(case.data_bytes, case.events)
    best_bridge = best_raw = float("inf")
    try:
        for _ in range(rounds):
            bridge = partial(bridge_publish, sink, encoder, resources, case.batch)
            best_bridge = min(best_bridge, await timed(bridge))
            messages = nats_messages(encoder.encode(resources))  # new ids: no duplicates
            best_raw = min(best_raw, await timed(partial(raw_nats, js, messages, case.batch)))
    finally:
        await sink.aclose()
        await nc.close()
    return Result(case, case.events / best_bridge, case.events / best_raw)


async def bench_redis(url: str, case: Case, rounds: int) -> Result:
    sink = RedisSink(RedisSinkConfig(url=url))
    await sink.connect()
    client = redis.asyncio.Redis.from_url(url)
    encoder = Encoder()
    resources = make_resources(case.data_bytes, case.events)
    stream = redis_stream_key(SOURCE) + ":raw"
    best_bridge = best_raw = float("inf")
    try:
        for _ in range(rounds):
            bridge = partial(bridge_publish, sink, encoder, resources, case.batch)
            best_bridge = min(best_bridge, await timed(bridge))
            entries = redis_entries(encoder.encode(resources))
            raw = partial(raw_redis, client, stream, entries, case.batch)
            best_raw = min(best_raw, await timed(raw))
            await client.flushdb()
    finally:
        await sink.aclose()
        await client.aclose()
    return Result(case, case.events / best_bridge, case.events / best_raw)


async def run(cases: list[Case], rounds: int) -> list[Result]:
    results = []
    with NatsServer() as nats_server, RedisServer() as redis_server:
        for case in cases:
            if case.broker == "nats":
                result = await bench_nats(nats_server.url, case, rounds)
            else:
                result = await bench_redis(redis_server.url, case, rounds)
            print(format_row(result), flush=True)
            results.append(result)
    return results


HEADER = f"{'broker':<7}{'data':>8}{'batch':>7}{'bridge ev/s':>14}{'raw ev/s':>12}{'ratio':>8}"


def format_row(r: Result) -> str:
    data = r.case.data_bytes
    size = f"{data // 1024} KiB" if data >= 1024 else f"{data} B"
    flag = "" if r.ratio >= 0.8 else "  < 0.8"
    return (
        f"{r.case.broker:<7}{size:>8}{r.case.batch:>7}{r.bridge_eps:>14,.0f}"
        f"{r.raw_eps:>12,.0f}{r.ratio:>8.2f}{flag}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--events", type=int, default=20_000, help="events per 300 B run")
    parser.add_argument("--broker", choices=["nats", "redis", "all"], default="all")
    args = parser.parse_args(argv)
    brokers = ["nats", "redis"] if args.broker == "all" else [args.broker]
    cases = [
        Case(broker, size, batch, args.events if size < 1024 else max(args.events // 4, batch))
        for broker in brokers
        for size in (300, 10 * 1024)
        for batch in (100, 1000)
    ]
    print(HEADER, flush=True)
    results = asyncio.run(run(cases, args.rounds))
    below = [r for r in results if r.ratio < 0.8]
    print(f"\n{len(results) - len(below)} of {len(results)} rows at ratio >= 0.8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
