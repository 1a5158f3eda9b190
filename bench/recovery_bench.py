"""Recovery from the broker: rebuilding 100,000 items' state vs reading them with a raw client.

``python -m bench.recovery_bench`` (``--help``) starts its own ``nats-server`` and
``redis-server`` on loopback, publishes ``items`` ``Added`` events of an object-store source
(about 300 B of data each) with the sinks (untimed), then times, best of ``rounds``:

* ``bridge``: :func:`bridge.state.recovery.recover` with a fresh sink and a fresh
  ``ObjectStorePoller``: the sink's ``read_published`` (NATS: a headers-only
  ``LAST_PER_SUBJECT`` push consumer; Redis: the items hash and the ``koprs-version`` field of
  each entry, by script) and the state built from it (a ``PackedState``);
* ``raw``: reading the same messages with the plain client, doing nothing with them: nats-py
  ``js.subscribe(ordered_consumer=True, deliver_policy=LAST_PER_SUBJECT, headers_only=True)``
  counting messages; redis-py ``HGETALL`` of the items hash and a pipelined ``XRANGE id id``
  per item in batches of 1,000, as a consumer's list phase does (whole entries).

The RSS the bridge's recovery adds (peak during the read, sampled every 5 ms, minus the RSS
before it) is reported per item. Targets: under 10 s for 100,000 items (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import redis.asyncio
from nats.js.api import DeliverPolicy

from bench.common import Row, format_table, rss_bytes, trim_heap, write_rows
from bridge.cloudevents import EventEncoder
from bridge.events import Added
from bridge.sinks import Sink
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import MemoryStore, StoredObject
from bridge.state.recovery import recover
from tests.support.servers import NatsServer, RedisServer

SOURCE = "files"
STREAM = "BENCH_RECOVERY"
TARGET_S_PER_100K = 10.0
BATCH = 1000


def events(items: int) -> list[Any]:
    encoder = EventEncoder(SOURCE, "s3://bench/files")
    objects = [
        Added(StoredObject(f"configs/team-{i % 100:03d}/item-{i:08d}.yaml", f"{i:032x}", 300))
        for i in range(items)
    ]
    return encoder.encode_all(objects, 1 << 32)


async def publish(sink: Sink, items: int) -> None:
    batch = events(items)
    await sink.connect()
    for start in range(0, len(batch), BATCH):
        await sink.publish(SOURCE, batch[start : start + BATCH])
    await sink.aclose()


class PeakRss:
    """The largest RSS seen by a sampling thread while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


async def bridge_recovery(make_sink: Callable[[], Sink], items: int) -> tuple[float, int]:
    """Seconds of one recovery, and the RSS it added at its peak."""
    sink = make_sink()
    await sink.connect()
    source = ObjectStorePoller(MemoryStore()).with_name(SOURCE)
    trim_heap()
    before = rss_bytes()
    with PeakRss() as rss:
        started = time.perf_counter()
        checkpoint = await recover(source, sink, SOURCE)
        assert checkpoint is not None
        source.restore(checkpoint.state)
        elapsed = time.perf_counter() - started
    await sink.aclose()
    assert len(source.state()) == items, len(source.state())
    return elapsed, rss.peak - before


async def raw_nats(url: str, items: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    done = asyncio.Event()
    seen = 0

    async def on_message(msg: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == items:
            done.set()

    started = time.perf_counter()
    sub = await js.subscribe(
        f"bench.{SOURCE}.>",
        stream=STREAM,
        cb=on_message,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        headers_only=True,
    )
    await done.wait()
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    await nc.close()
    return elapsed


async def raw_redis(url: str, items: int) -> float:
    client = redis.asyncio.Redis.from_url(url)
    stream = f"koprs:external:{SOURCE}"
    started = time.perf_counter()
    listing: Any = await client.hgetall(f"{{{stream}}}:items")
    ids = list(listing.values())
    read = 0
    for start in range(0, len(ids), BATCH):
        pipe = client.pipeline(transaction=False)
        for entry_id in ids[start : start + BATCH]:
            pipe.xrange(stream, entry_id, entry_id)
        read += sum(len(found) for found in await pipe.execute())
    elapsed = time.perf_counter() - started
    await client.aclose()
    assert read == items, read
    return elapsed


def recovery_of(
    make_sink: Callable[[], Sink], items: int
) -> Callable[[], Awaitable[tuple[float, int]]]:
    return lambda: bridge_recovery(make_sink, items)


async def best(rounds: int, measure: Callable[[], Awaitable[Any]]) -> Any:
    results = [await measure() for _ in range(rounds)]
    return min(results, key=lambda r: r[0] if isinstance(r, tuple) else r)


async def measure(items: int, rounds: int) -> list[Row]:
    rows = []
    with NatsServer() as nats_server, RedisServer() as redis_server:
        nats_config = NatsSinkConfig(
            url=nats_server.url, stream=STREAM, subject_prefix="bench", ack_timeout_s=30.0
        )
        redis_config = RedisSinkConfig(url=redis_server.url, timeout_s=60.0)
        cases: list[tuple[str, Callable[[], Sink], Callable[[], Awaitable[float]]]] = [
            ("NATS", lambda: NatsSink(nats_config), lambda: raw_nats(nats_server.url, items)),
            ("Redis", lambda: RedisSink(redis_config), lambda: raw_redis(redis_server.url, items)),
        ]
        for broker, make_sink, raw in cases:
            print(f"recovery: publishing {items:,} events to {broker} ...", flush=True)
            await publish(make_sink(), items)
            elapsed, added = await best(rounds, recovery_of(make_sink, items))
            reference = await best(rounds, raw)
            limit = TARGET_S_PER_100K * items / 100_000
            print(f"recovery: {broker} bridge {elapsed:.2f} s, raw {reference:.2f} s", flush=True)
            rows.append(
                Row(
                    "recovery",
                    f"{broker}, {items:,} items",
                    f"{elapsed:.2f} s ({items / elapsed:,.0f} items/s)",
                    f"raw read {reference:.2f} s",
                    elapsed / reference,
                    f"< {limit:.3g} s",
                    elapsed < limit,
                    f"ratio = bridge / raw (time); RSS added at the peak of the recovery "
                    f"{added / items:.0f} B/item ({added / 2**20:.1f} MiB); the raw read "
                    + (
                        "is an ordered headers-only LAST_PER_SUBJECT consumer"
                        if broker == "NATS"
                        else "is HGETALL + pipelined XRANGE of whole entries"
                    ),
                    {"bridge_s": elapsed, "raw_s": reference, "rss_added_b": added},
                )
            )
    return rows


def run_rows(*, items: int = 100_000, rounds: int = 2) -> list[Row]:
    return asyncio.run(measure(items, rounds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2, help="best of N (default 2)")
    parser.add_argument("--rows-json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = run_rows(items=args.items, rounds=args.rounds)
    print(format_table(rows))
    for row in rows:
        print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
