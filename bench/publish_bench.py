"""Throughput of the bridge's publish path against the raw client libraries, in the same run.

Run ``.venv/bin/python bench/publish_bench.py`` (``--help`` for options; ``--quick`` for a
short run). It starts its own ``nats-server`` and ``redis-server`` on free loopback ports
(``tests/support/servers.py``), then, for each broker, event size (``data`` of about 300 B and
10 KiB) and batch size (100 and 1000 events), measures events per second of:

* ``raw``: the same messages, encoded beforehand, sent with nats-py ``js.publish_async`` and the
  same headers (then ``publish_async_completed``) per batch, or with a redis-py pipeline of
  ``XADD MAXLEN ~`` with the same fields per batch. It is the denominator of every row's ratio.
* ``sink only``: ``EventEncoder.encode`` of every event, then ``NatsSink.publish`` /
  ``RedisSink.publish`` per batch (acknowledgements awaited); no source, no state.
* ``loop+memory``, ``loop+file``, ``loop+redis``: the real delivery path. A synthetic source
  (``SyntheticSource``: every poll returns a changeset of N ``Added``/``Modified`` events for N
  distinct keys and the matching delta, as an object store in which every object changed) is
  driven by ``SourceLoop.step()`` with ``max_batch_events=<batch>``, so every batch goes
  through encode -> ``state.begin(intent)`` -> ``sink.publish`` (acks) -> ``state.commit``,
  with the state stores users run: ``MemoryStateStore`` (one replica, no persistence),
  ``FileStateStore`` (one replica with ``state: <path>``, fsync per write) and
  ``RedisStateStore`` (replicas with leader election: a lease is acquired with ``LeaseClient``
  on the bench's redis-server, database 1, and kept renewed while the loop runs, which is
  guarded by it as in the coordinator).

Each round measures raw and then every bridge path once on new event ids (nothing is dropped
as a duplicate); a row reports the best of the rounds (default 5), and its ratio is against the
best raw rate of the same case. Before each timed run the garbage collector is run and what
exists is frozen (``gc.freeze``), so that no run pays for scanning the other runs' prepared
inputs; after it the broker is emptied (JetStream stream purged, Redis database 0 flushed),
untimed. The ``µs/event`` columns split the best run of a row: ``intent`` (``state.begin``),
``publish`` (``sink.publish``, acks included), ``commit`` (``state.commit``) and ``rest``
(encoding; for the loop rows also the source's ``changes()``, splitting the changeset and the
loop itself), measured by thin proxies around the state store and the sink (about a
microsecond per batch). After the table, the size of each ``FileStateStore`` journal and the
time to load it are printed. The target is a ratio >= 0.8 for every row. The default run takes
about two minutes on two CPUs; ``--quick`` about ten seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import redis.asyncio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.events import Added, ExternalEvent, Modified
from bridge.ha.checkpoints import RedisStateStore
from bridge.ha.leases import Lease, LeaseClient
from bridge.service.delivery import SourceLoop, SourceSpec
from bridge.sinks import Sink
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.base import Changeset, Replay, StateDelta, StateMapSource
from bridge.sources.http import HttpResource
from bridge.state import Checkpoint, Intent, MemoryStateStore, StateStore
from bridge.state.files import FileStateStore
from bridge.subjects import nats_subject, redis_stream_key
from bridge.watching import WatchConfig
from tests.support.servers import NatsServer, RedisServer

T = TypeVar("T")
SOURCE_URI = "https://example.test/items"
STREAM = "BENCH"
TARGET = 0.8
LEASE_TTL_S = 10.0  # the service's default lease_ttl
STATE_DB = 1  # RedisStateStore's database on the bench's redis-server (the sink uses 0)

RAW = "raw"
SINK_ONLY = "sink only"
LOOP_MEMORY = "loop+memory"
LOOP_FILE = "loop+file"
LOOP_REDIS = "loop+redis"
PATHS = (SINK_ONLY, LOOP_MEMORY, LOOP_FILE, LOOP_REDIS)
PATH_CHOICES = {"sink": SINK_ONLY, "memory": LOOP_MEMORY, "file": LOOP_FILE, "redis": LOOP_REDIS}


@dataclass(frozen=True)
class Case:
    broker: str
    data_bytes: int
    batch: int
    events: int


@dataclass
class Stages:
    """Seconds spent in each stage of one timed run."""

    total: float = 0.0
    begin: float = 0.0
    publish: float = 0.0
    commit: float = 0.0

    def per_event_us(self, events: int) -> tuple[float, float, float, float]:
        rest = self.total - self.begin - self.publish - self.commit
        scale = 1e6 / events
        return self.begin * scale, self.publish * scale, self.commit * scale, rest * scale


@dataclass
class Row:
    case: Case
    path: str
    best: Stages
    raw_eps: float

    @property
    def bridge_eps(self) -> float:
        return self.case.events / self.best.total

    @property
    def ratio(self) -> float:
        return self.bridge_eps / self.raw_eps


# -- the synthetic source --


class SyntheticSource(StateMapSource):
    """A source in which every one of ``keys`` items changed at every poll.

    ``changes()`` returns one event per key (``Added`` for a key its committed state does not
    hold, ``Modified`` otherwise) and a delta setting each key's new ETag, as
    ``ObjectStorePoller`` would for a bucket whose objects were all rewritten. The resources
    (``HttpResource``, so that the event's ``data`` is about ``data_bytes`` long) are built by
    :meth:`prepare`, outside the timed region: the listing diff has its own benchmark.
    """

    def __init__(self, name: str, data_bytes: int, keys: int) -> None:
        self._name = name
        self._state: dict[str, str] = {}
        overhead = 290  # url, status, etag, digest, ... of the data object without the body
        body_len = max(8, data_bytes - overhead)
        self._urls = [f"{SOURCE_URI}/{i:08d}" for i in range(keys)]
        self._bodies = [(f"{i:08d}" + "x" * body_len)[:body_len].encode() for i in range(keys)]
        self._digests = [hashlib.sha256(body).hexdigest() for body in self._bodies]
        self._resources: list[tuple[HttpResource, str]] = []
        self._generation = 0

    @property
    def name(self) -> str:
        return self._name

    def prepare(self) -> None:
        """Give every item a new version (a new ETag) for the next poll."""
        self._generation += 1
        generation = self._generation
        resources = []
        for i, (url, body, digest) in enumerate(
            zip(self._urls, self._bodies, self._digests, strict=True)
        ):
            etag = f'"{generation:08x}{i:024x}"'
            resource = HttpResource(
                url=url, status=200, body=body, etag=etag, content_type="text/plain", digest=digest
            )
            resources.append((resource, etag))
        self._resources = resources

    async def changes(self, replay: Replay | None = None) -> Changeset:
        state = self._state
        events: list[ExternalEvent[Any]] = []
        delta: StateDelta = {}
        for resource, etag in self._resources:
            events.append(Modified(resource) if resource.url in state else Added(resource))
            delta[resource.url] = etag
        return Changeset(events, delta, state)


# -- proxies that time the stages --


class TimedStore:
    """A state store whose ``begin`` and ``commit`` add their time to :attr:`stages`."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.stages = Stages()

    async def load(self, source_name: str) -> Checkpoint | None:
        return await self.store.load(source_name)

    async def begin(self, source_name: str, intent: Intent) -> None:
        started = time.perf_counter()
        try:
            await self.store.begin(source_name, intent)
        finally:
            self.stages.begin += time.perf_counter() - started

    async def commit(
        self,
        source_name: str,
        revision: int,
        delta: StateDelta,
        next_intent: Intent | None = None,
    ) -> None:
        started = time.perf_counter()
        try:
            await self.store.commit(source_name, revision, delta, next_intent)
        finally:
            self.stages.commit += time.perf_counter() - started

    async def reset(self, source_name: str) -> None:
        await self.store.reset(source_name)

    async def aclose(self) -> None:
        await self.store.aclose()


class TimedSink:
    """A sink whose ``publish`` adds its time to :attr:`stages`."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.stages = Stages()

    @property
    def description(self) -> str:
        return self.sink.description

    async def connect(self) -> None:
        await self.sink.connect()

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        started = time.perf_counter()
        try:
            await self.sink.publish(source_name, events)
        finally:
            self.stages.publish += time.perf_counter() - started

    async def aclose(self) -> None:
        await self.sink.aclose()


# -- what is measured --


@dataclass
class Variant:
    """One row of a case: ``prepare`` (untimed) then ``run`` (timed), once per round."""

    path: str
    prepare: Callable[[], Awaitable[None]]
    run: Callable[[Stages], Awaitable[None]]
    """Runs once; fills in the stages it can measure (``total`` is set by the caller)."""
    check: Callable[[], Awaitable[str | None]] | None = None
    """Verifies, after the last round, that the work was really done (untimed); may return
    a note for the report."""
    best: Stages = field(default_factory=lambda: Stages(total=float("inf")))


def batches(events: Sequence[T], size: int) -> list[Sequence[T]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


class Encoder:
    """Encodes with a new revision per call so that every round has new event ids."""

    def __init__(self, source_name: str) -> None:
        self.encoder = EventEncoder(source_name, SOURCE_URI)
        self.revision = itertools.count(1)

    def encode(self, events: Sequence[ExternalEvent[Any]]) -> list[CloudEvent]:
        revision = next(self.revision)
        return [self.encoder.encode(event, revision) for event in events]


async def polled(source: SyntheticSource) -> list[ExternalEvent[Any]]:
    """The events of the next poll of ``source``, its state left as it was."""
    source.prepare()
    return (await source.changes()).events


NatsMessage = tuple[str, dict[str, str], bytes]


def nats_messages(source_name: str, events: Sequence[CloudEvent]) -> list[NatsMessage]:
    messages = []
    for event in events:
        headers, body = event.to_binary()
        headers["Nats-Msg-Id"] = event.id
        messages.append((nats_subject(source_name, event.subject), headers, body))
    return messages


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


def raw_variant(case: Case, broker: Broker) -> Variant:
    """Pre-encoded messages through the client library's own pipelined publish."""
    name = "bench-raw"
    source = SyntheticSource(name, case.data_bytes, case.events)
    encoder = Encoder(name)
    nats_ready: list[NatsMessage] = []
    redis_ready: list[RedisFields] = []

    async def prepare() -> None:
        events = encoder.encode(await polled(source))
        if case.broker == "nats":
            nats_ready[:] = nats_messages(name, events)
        else:
            redis_ready[:] = redis_entries(events)

    async def run_nats(stages: Stages) -> None:
        js = broker.js
        assert js is not None
        for chunk in batches(nats_ready, case.batch):
            for subject, headers, body in chunk:
                await js.publish_async(subject, body, headers=headers)
            await js.publish_async_completed()

    async def run_redis(stages: Stages) -> None:
        client = broker.redis
        assert client is not None
        stream = redis_stream_key(name)
        for chunk in batches(redis_ready, case.batch):
            pipe = client.pipeline(transaction=False)
            for fields in chunk:
                pipe.xadd(stream, fields, maxlen=100_000, approximate=True)
            await pipe.execute()

    return Variant(RAW, prepare, run_nats if case.broker == "nats" else run_redis)


def sink_variant(case: Case, sink: Sink) -> Variant:
    """Encode each batch, publish it, wait for the acks: no source state, no state store."""
    name = "bench-sink"
    source = SyntheticSource(name, case.data_bytes, case.events)
    encoder = Encoder(name)
    timed_sink = TimedSink(sink)
    ready: list[ExternalEvent[Any]] = []

    async def prepare() -> None:
        ready[:] = await polled(source)

    async def run(stages: Stages) -> None:
        timed_sink.stages = stages
        for chunk in batches(ready, case.batch):
            await timed_sink.publish(name, encoder.encode(chunk))

    return Variant(SINK_ONLY, prepare, run)


async def loop_variant(
    path: str,
    case: Case,
    sink: Sink,
    store: StateStore,
    guard: Callable[[], None] | None = None,
) -> Variant:
    """``SourceLoop.step()`` over one poll of a :class:`SyntheticSource`: every batch goes
    through encode -> state.begin(intent) -> sink.publish (acks) -> state.commit."""
    name = "bench-" + path.removeprefix("loop+")
    source = SyntheticSource(name, case.data_bytes, case.events)
    timed_store = TimedStore(store)
    timed_sink = TimedSink(sink)
    spec = SourceSpec(
        name=name,
        source=source,
        watch=WatchConfig(1.0),
        source_uri=SOURCE_URI,
        max_batch_events=case.batch,
    )
    loop = SourceLoop(spec, timed_sink, timed_store, guard=guard)
    await loop.restore()  # a new lineage: its first revision is committed here, untimed
    first_revision = loop.revision
    runs = 0

    async def prepare() -> None:
        source.prepare()

    async def run(stages: Stages) -> None:
        nonlocal runs
        runs += 1
        timed_store.stages = timed_sink.stages = stages
        batches_before = loop.committed_batches
        error = await loop.step()
        if error is not None:
            raise RuntimeError(f"{path}: the step failed") from error
        expected = -(-case.events // case.batch)
        if loop.committed_batches - batches_before != expected:
            raise RuntimeError(f"{path}: {loop.committed_batches - batches_before} batches")

    async def check() -> str | None:
        started = time.perf_counter()
        checkpoint = await store.load(name)
        load_s = time.perf_counter() - started
        if (
            checkpoint is None
            or checkpoint.intent is not None
            or checkpoint.revision != loop.revision
            or loop.revision == first_revision
            or len(checkpoint.state) != case.events
            or checkpoint.state != dict(source.state())
        ):
            raise RuntimeError(f"{path}: the stored checkpoint is not the source's state")
        if not isinstance(store, FileStateStore):
            return None
        written = runs * case.events
        size = store.path(name).stat().st_size
        return (
            f"{case_label(case)} {path}: journal {size / 2**20:,.1f} MiB after {written:,} "
            f"events ({size / written:,.0f} B/event, state {case.events:,} entries); "
            f"loading it took {load_s:.2f} s"
        )

    return Variant(path, prepare, run, check)


# -- servers, clients and the cases --


@dataclass
class Broker:
    """The bench's servers and the raw clients."""

    nats_url: str
    redis_url: str
    state_dir: Path
    nc: NatsClient | None = None
    js: JetStreamContext | None = None
    redis: redis.asyncio.Redis | None = None

    def redis_state_url(self) -> str:
        return self.redis_url.rsplit("/", 1)[0] + f"/{STATE_DB}"

    async def clear(self, broker: str) -> None:
        """Empty what the runs published (untimed), so the broker does not grow."""
        if broker == "nats":
            assert self.js is not None
            await self.js.purge_stream(STREAM)
        else:
            assert self.redis is not None
            await self.redis.flushdb()


async def held_lease(
    stack: contextlib.AsyncExitStack, client: redis.asyncio.Redis, source: str
) -> Lease:
    """The lease on ``source``, renewed in the background until ``stack`` closes."""
    leases = LeaseClient(client, "bench-replica", ttl_s=LEASE_TTL_S, prefix="koprs:bench:")
    lease = await leases.acquire(source)
    if lease is None:
        raise RuntimeError(f"the lease on {source!r} is held by someone else")
    keeper = asyncio.create_task(leases.keep(lease, LEASE_TTL_S / 3))

    async def give_back() -> None:
        # lost first, as the coordinator does: on Python 3.11 a cancellation that arrives while
        # redis-py sends a command (its asyncio.wait_for) can be swallowed, and the keeper would
        # go on renewing for ever; it also returns at its next wake-up once lost is set
        lease.lost.set()
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await leases.release(lease)

    stack.push_async_callback(give_back)
    return lease


async def bench_case(
    broker: Broker, case: Case, rounds: int, paths: Sequence[str], notes: list[str]
) -> list[Row]:
    async with contextlib.AsyncExitStack() as stack:
        sink: Sink
        if case.broker == "nats":
            sink = NatsSink(NatsSinkConfig(url=broker.nats_url, stream=STREAM))
        else:
            sink = RedisSink(RedisSinkConfig(url=broker.redis_url))
        await sink.connect()
        stack.push_async_callback(sink.aclose)
        variants = [raw_variant(case, broker)]
        if SINK_ONLY in paths:
            variants.append(sink_variant(case, sink))
        if LOOP_MEMORY in paths:
            variants.append(await loop_variant(LOOP_MEMORY, case, sink, MemoryStateStore()))
        if LOOP_FILE in paths:
            folder = Path(tempfile.mkdtemp(prefix="journal-", dir=broker.state_dir))
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
            store = FileStateStore(folder)
            variants.append(await loop_variant(LOOP_FILE, case, sink, store))
        if LOOP_REDIS in paths:
            client = redis.asyncio.Redis.from_url(
                broker.redis_state_url(),
                socket_timeout=LEASE_TTL_S / 4,  # as the service's coordinator connects
                socket_connect_timeout=LEASE_TTL_S / 4,
            )
            stack.push_async_callback(client.aclose)
            await client.flushdb()
            lease = await held_lease(stack, client, "bench-redis")
            redis_store = RedisStateStore(client, {lease.source: lease})
            variants.append(
                await loop_variant(LOOP_REDIS, case, sink, redis_store, guard=lease.check)
            )
        await broker.clear(case.broker)
        for _ in range(rounds):
            for variant in variants:
                await variant.prepare()
                stages = Stages()
                gc.collect()
                gc.freeze()  # what exists now (every variant's inputs) is not scanned again
                try:
                    started = time.perf_counter()
                    await variant.run(stages)
                    stages.total = time.perf_counter() - started
                finally:
                    gc.unfreeze()
                if stages.total < variant.best.total:
                    variant.best = stages
                await broker.clear(case.broker)
        for variant in variants:
            if variant.check is not None and (note := await variant.check()):
                notes.append(note)
    raw_eps = case.events / variants[0].best.total
    return [Row(case, v.path, v.best, raw_eps) for v in variants[1:]]


async def run(
    cases: list[Case], rounds: int, paths: Sequence[str], state_dir: Path, notes: list[str]
) -> list[Row]:
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="koprs-bench-state-", dir=state_dir))
    try:
        with NatsServer() as nats_server, RedisServer() as redis_server:
            broker = Broker(nats_server.url, redis_server.url, folder)
            broker.nc = await nats.connect(nats_server.url)
            broker.js = broker.nc.jetstream()
            broker.redis = redis.asyncio.Redis.from_url(redis_server.url)
            try:
                for case in cases:
                    for row in await bench_case(broker, case, rounds, paths, notes):
                        print(format_row(row), flush=True)
                        rows.append(row)
            finally:
                await broker.nc.close()
                await broker.redis.aclose()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


HEADER = (
    f"{'broker':<7}{'data':>7}{'batch':>6}  {'path':<12}{'bridge ev/s':>12}{'raw ev/s':>10}"
    f"{'ratio':>7}   {'µs/event:':<9}{'intent':>7}{'publish':>8}{'commit':>7}{'rest':>6}"
)


def case_label(case: Case) -> str:
    data = case.data_bytes
    size = f"{data // 1024} KiB" if data >= 1024 else f"{data} B"
    return f"{case.broker:<7}{size:>7}{case.batch:>6}"


def format_row(r: Row) -> str:
    begin, publish, commit, rest = r.best.per_event_us(r.case.events)
    flag = "" if r.ratio >= TARGET else f"  < {TARGET}"
    return (
        f"{case_label(r.case)}  {r.path:<12}{r.bridge_eps:>12,.0f}"
        f"{r.raw_eps:>10,.0f}{r.ratio:>7.2f}   {'':<9}{begin:>7.1f}{publish:>8.1f}"
        f"{commit:>7.1f}{rest:>6.1f}{flag}"
    )


def sizes_arg(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="best of N (default 5)")
    parser.add_argument(
        "--events",
        type=int,
        default=20_000,
        help="events per run with 300 B of data; a quarter of that with 10 KiB (default 20000)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run: 5000 events, best of 2")
    parser.add_argument("--broker", choices=["nats", "redis", "all"], default="all")
    parser.add_argument(
        "--data",
        default="300,10k",
        help="sizes of the events' data, comma-separated, in bytes or with a k (KiB) suffix "
        "(default 300,10k); from 1k on, a run has a quarter of --events",
    )
    parser.add_argument(
        "--batch", default="100,1000", help="batch sizes, comma-separated (default 100,1000)"
    )
    parser.add_argument(
        "--paths",
        default="all",
        help="comma-separated bridge paths to measure: sink, memory, file, redis (default all)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where FileStateStore journals are written (default: the temporary directory); "
        "put it on the disk the bridge's `state:` path would use",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds = 5000, 2
    if args.paths == "all":
        paths = list(PATHS)
    else:
        try:
            paths = [PATH_CHOICES[p.strip()] for p in args.paths.split(",")]
        except KeyError as exc:
            parser.error(f"unknown path {exc}; choose among {', '.join(PATH_CHOICES)}")
    try:
        sizes = [sizes_arg(part) for part in args.data.split(",")]
        batch_sizes = [int(part) for part in args.batch.split(",")]
    except ValueError as exc:
        parser.error(f"--data or --batch: {exc}")
    if min(sizes) < 1 or min(batch_sizes) < 1 or args.events < 1 or args.rounds < 1:
        parser.error("sizes, batches, --events and --rounds must be >= 1")
    brokers = ["nats", "redis"] if args.broker == "all" else [args.broker]
    cases = [
        Case(broker, size, batch, args.events if size < 1024 else max(args.events // 4, batch))
        for broker in brokers
        for size in sizes
        for batch in batch_sizes
    ]
    print(HEADER, flush=True)
    started = time.perf_counter()
    notes: list[str] = []
    rows = asyncio.run(run(cases, args.rounds, paths, args.state_dir, notes))
    elapsed = time.perf_counter() - started
    below = [r for r in rows if r.ratio < TARGET]
    loop_rows = [r for r in rows if r.path != SINK_ONLY]
    loop_ok = [r for r in loop_rows if r.ratio >= TARGET]
    print(
        f"\n{len(rows) - len(below)} of {len(rows)} rows at ratio >= {TARGET} "
        f"(full delivery path: {len(loop_ok)} of {len(loop_rows)}); {elapsed:.0f} s"
    )
    if notes:
        print("\nFileStateStore journals at the end of each case:")
        for note in notes:
            print(f"  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
