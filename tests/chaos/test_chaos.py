"""The failure suite: seeded random faults against 3 replicas while the sources keep changing.

Every run is seeded: the seed is printed and in the test id. ``KOPRS_CHAOS_SEED=<n>`` runs that
seed instead of the fixed ones, ``KOPRS_CHAOS_FAULTS=<n>`` injects ``n`` faults per run (every
kind once before any twice), ``KOPRS_CHAOS_RECOVERY=<s>`` bounds each wait for recovery (default
60). Timings differ from run to run (the machine decides them); the choices (which change, which
fault, which target, how long) follow the seed.

The world:

* 3 bridge replicas, each ``python -m bridge run`` (tests/support/replicas.py), with leader election and
  checkpoints on a redis-server with an append-only file (restarts keep the data);
* the broker: a nats-server with JetStream and a file store (restarts keep the stream), or, in
  the Redis Streams variant, the same redis-server;
* sources: 2 HTTP documents (tests/support/httpserver.py) and 2 prefixes of one bucket on moto's S3
  server (3 and 2 objects), polled every 0.25 s; moto keeps state in memory, so it is never
  restarted.

While one task per item changes it (a new version, or a removal) and holds each state for a
random time (mostly several intervals, sometimes less than one), a fault injector injects faults
of these kinds, one at a time, in a seeded order (the fixed seeds cover every kind together):

* ``kill``: SIGKILL the leader of a random source, restart it (same replica id) a little later;
* ``pause``: SIGSTOP the leader of a random source, shorter or longer than the lease TTL, then
  SIGCONT (a paused leader past its TTL must be fenced out);
* ``kill-in-flight`` / ``pause-in-flight`` (NATS): freeze nats-server, wait for a leader to
  record a publish intent (Redis keyspace notification), SIGKILL / SIGSTOP (past the TTL) that
  leader while it waits for the broker's acknowledgements, thaw nats-server (the frozen
  messages then land): a new leader republishes the unsettled batch, the broker drops copies;
* ``pause-server``: SIGSTOP redis-server or nats-server (the socket stays open, nothing answers);
* ``restart-nats`` / ``restart-redis``: stop the server, keep it down a moment, start it on the
  same port with the same data;
* on the 3-node NATS cluster (R3 stream, ``test_chaos_nats_cluster``): ``kill-stream-leader``
  (SIGKILL the node leading the stream, start it again with its store) and ``kill-node`` (a
  random node), besides ``kill`` and ``pause`` of replicas;
* on Redis Cluster (3 primaries + 3 replicas, ``test_chaos_redis_cluster``) and Sentinel (a
  primary, a replica, 3 sentinels, ``test_chaos_redis_sentinel``), which then carry the
  broker *and* leader election and checkpoints (no separate redis-server):
  ``kill-stream-primary`` (SIGKILL the Cluster primary owning a random source's stream slot)
  and ``kill-lease-primary`` (the one owning the election's slot: every lease, fence and
  checkpoint), or ``kill-primary`` on Sentinel; the replica is promoted, the killed node is
  started again a moment later (with its append-only file) and rejoins as a replica; besides
  ``kill`` and ``pause`` of replicas (Cluster: ``kill`` only). ``pause-primary`` SIGSTOPs the
  primary (of the election's slot, on the Cluster) until its replica is promoted, then
  resumes it: a stale primary that still takes writes on the bridge's open connections until
  the cluster's gossip (fast) or the sentinels (up to ~10 s) demote it, and loses them then.
  Every write that counts waits for a replica there (the sink's and leader election's
  ``WAIT``), so while the promoted primary has no replica the sources stall: the fault's
  window lasts until the killed node is back. Without the sink's ``WAIT`` (``broker.replicas:
  1``) the Sentinel variant fails on ``pause-primary`` (seeds 2, 5, 6: stream entries taken by
  the stale primary lost, items' events out of line with their history).

The variant **without any state store** (``test_chaos_nats_without_state_store``): one replica,
no leader election, source state in memory only, so every start rebuilds it from the stream
(``bridge.state.recovery``); its faults are ``kill`` and ``kill-in-flight`` of that replica
(in flight: nats-server frozen a moment before the kill, so a publish is likely waiting for its
acknowledgements), ``pause-server`` and ``restart-nats``. The same checks hold: a restart must
publish nothing again (no id twice, nothing re-``Added``) and lose no change.

A fault's window lasts from its start until the system demonstrably recovered: every source
leased, no replica above its fair share, and every source has published a version that was made
after that (bounded: a bridge that does not recover fails the test). A lease hand-over a replica
logs outside the injected faults (a replica starved of CPU past its lease TTL on a busy machine)
gets a window too, and is counted in the report. Between faults the system runs undisturbed for
a random quiet time.

An independent consumer reads the broker's stream (raw nats-py ``STREAM.MSG.GET`` by sequence,
or ``XRANGE`` on Redis) and, on NATS, a live ordered push consumer records every delivery too.
After the changes stop, the test waits until the consumer's state of every item equals the truth
(bounded), stops the replicas (each must exit 0 on SIGTERM) and checks (tests/chaos/history.py):
no event id twice, every item's events consistent, in the true order and never invented, every
state that held ``HOLD_S`` outside the fault windows delivered (removals included), the final
state of every item reached. On NATS, the live consumer got exactly the stream's messages, in
order. Each run adds a line to the session's summary (faults survived, events checked, time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from bridge.connections import redis_client
from bridge.ha.keys import SourceKeys, as_text, prefix_for, replicas_key
from bridge.subjects import redis_stream_key
from tests.chaos.conftest import REPORTS
from tests.chaos.history import Delivered, Fault, Faults, Item, Truth, check_item
from tests.support.clusters import NatsCluster, RedisClusterSet, SentinelSet, wait_until
from tests.support.clusters import kill as kill_server
from tests.support.httpserver import Documents
from tests.support.receiving import Received, decode_nats, decode_redis, validate
from tests.support.replicas import (
    Cluster,
    Event,
    cluster,
    holders,
    kind,
    logged,
    until,
    version,
)
from tests.support.servers import (
    NatsServer,
    PersistentRedisServer,
    S3Server,
    ServerError,
    ServerProcess,
)

Broker = Literal["nats", "redis", "nats-cluster", "redis-cluster", "redis-sentinel"]

NATS_SEEDS = (1, 6)
REDIS_SEEDS = (3,)
NATS_CLUSTER_SEEDS = (2,)
"""The 3-node NATS cluster with an R3 stream (tests/support/clusters.py)."""
REDIS_CLUSTER_SEEDS = (1,)
"""Redis Cluster (3 primaries + 3 replicas): broker, leader election and checkpoints."""
REDIS_SENTINEL_SEEDS = (2,)
"""Redis Sentinel (a primary, a replica, 3 sentinels): broker, leader election, checkpoints."""
INTERVAL_S = 0.25
MAX_BACKOFF_S = 1.0
LEASE_TTL_S = 2.0
RENEW_EVERY_S = 0.3
HOLD_S = 4 * INTERVAL_S
"""A state held this long outside every fault window must be delivered (the guarantee says one
interval; four leave room for slow steps on a busy machine)."""
RECOVERY_S = float(os.environ.get("KOPRS_CHAOS_RECOVERY", "60"))
"""Bound on the recovery after one fault and on the final wait for the consumer."""
REPLICAS = ("r1", "r2", "r3")
STREAM = "KOPRS_EXTERNAL"
REDIS_PREFIX = "koprs:bridge:"

HTTP_SOURCES = ("h1", "h2")
S3_SOURCES = {"b1": ("k0", "k1", "k2"), "b2": ("k0", "k1")}
SOURCES = (*HTTP_SOURCES, *S3_SOURCES)
SHARE = math.ceil(len(SOURCES) / len(REPLICAS))

FAULTS: dict[Broker, tuple[str, ...]] = {
    "nats": (
        "kill",
        "kill-in-flight",
        "pause",
        "pause-in-flight",
        "pause-server",
        "restart-nats",
        "restart-redis",
    ),
    "redis": ("kill", "pause", "pause-server", "restart-redis"),
    # kill-stream-leader: SIGKILL the NATS node leading the stream, start it again later
    # (with its store); kill-node: the same for a random node (the replicas connected
    # to it reconnect to another)
    "nats-cluster": ("kill", "kill-stream-leader", "kill-node", "pause"),
    # kill-stream-primary: SIGKILL the Redis Cluster primary owning a source's stream slot;
    # kill-lease-primary: the one owning the election's slot (leases, fences, checkpoints);
    # its replica is promoted, the killed node comes back later as a replica
    # pause-primary: SIGSTOP the primary owning the election's slot (Cluster) or the primary
    # (Sentinel) until its replica is promoted, then SIGCONT it: a stale primary for a moment
    "redis-cluster": ("kill", "kill-stream-primary", "kill-lease-primary", "pause-primary"),
    # kill-primary: SIGKILL the primary, the sentinels promote the replica; the killed node
    # comes back later (the sentinels make it a replica)
    "redis-sentinel": ("kill", "pause", "kill-primary", "pause-primary"),
}
FAULTS_PER_RUN: dict[Broker, int] = {
    "nats": 4,
    "redis": 4,
    "nats-cluster": 4,
    "redis-cluster": 4,
    "redis-sentinel": 4,
}
"""Faults of one run: a seeded choice of kinds (the fixed seeds cover every kind together)."""
STATELESS_FAULTS = ("kill", "kill-in-flight", "pause-server", "restart-nats")
"""The faults of the variant without a state store (one replica, NATS)."""
STATELESS_SEEDS = (2,)


def seeds(fixed: Sequence[int]) -> list[int]:
    chosen = os.environ.get("KOPRS_CHAOS_SEED", "").strip()
    return [int(chosen)] if chosen else list(fixed)


def fault_plan(
    broker: Broker, seed: int, count: int | None = None, *, stateless: bool = False
) -> list[str]:
    """The kinds of fault a run injects, in order: ``count`` (default ``KOPRS_CHAOS_FAULTS``,
    else :data:`FAULTS_PER_RUN`) drawn from the broker's kinds, every kind once before any
    twice."""
    kinds = STATELESS_FAULTS if stateless else FAULTS[broker]
    if count is None:
        count = int(os.environ.get("KOPRS_CHAOS_FAULTS", FAULTS_PER_RUN[broker]))
    rng = random.Random(f"plan-{seed}")
    plan: list[str] = []
    while len(plan) < count:
        plan += rng.sample(kinds, k=len(kinds))
    return plan[:count]


# -- the sources and their true history ------------------------------------------------------


class World:
    """The sources, changed only through here so that :attr:`truth` records every state."""

    def __init__(self, docs: Documents, s3: S3Server, bucket: str, seed: int) -> None:
        self.docs = docs
        self.s3 = s3.client()
        self.bucket = bucket
        self.seed = seed
        self.truth = Truth()
        self.items: list[Item] = []
        self.urls = {name: docs.url(name) for name in HTTP_SOURCES}
        for name in HTTP_SOURCES:
            self.items.append((name, self.urls[name]))
        for name, keys in S3_SOURCES.items():
            self.items += [(name, f"{name}/{key}") for key in keys]
        for item in self.items:
            self.truth.add_item(item)
        self._counter = 0

    async def change(self, item: Item, present: bool) -> None:
        """Make ``item`` present with new content, or absent."""
        source, subject = item
        began = time.monotonic()
        self._counter += 1
        body = json.dumps({"item": subject, "n": self._counter, "seed": self.seed}).encode()
        new: str | None = None
        if source in HTTP_SOURCES:
            new = self.docs.set(source, body if present else None)
        elif present:
            reply = await asyncio.to_thread(
                self.s3.put_object, Bucket=self.bucket, Key=subject, Body=body
            )
            new = str(reply["ETag"]).strip('"')
        else:
            await asyncio.to_thread(self.s3.delete_object, Bucket=self.bucket, Key=subject)
        self.truth.record(item, new, began, time.monotonic())

    def made_after(self, event: Event, moment: float) -> bool:
        """Whether ``event`` carries a version that was made after ``moment``."""
        if kind(event) == "removed":
            return False
        item = (event["_source_name"], event["subject"])
        if item not in self.truth.items:
            return False
        since = self.truth.since(item, version(event))
        return since is not None and since > moment


def hold_time(rng: random.Random) -> float:
    """Mostly long enough to be seen for sure, sometimes shorter than one poll interval."""
    draw = rng.random()
    if draw < 0.55:
        return rng.uniform(HOLD_S + 0.2, HOLD_S + 1.0)
    if draw < 0.8:
        return rng.uniform(0.0, 0.6 * INTERVAL_S)
    return rng.uniform(INTERVAL_S, HOLD_S)


async def keep_changing(world: World, item: Item, rng: random.Random, stop: asyncio.Event) -> None:
    """Change ``item`` until ``stop`` is set; its last state then holds."""
    while not stop.is_set():
        present = world.truth.current(item) is not None
        await world.change(item, present=not present or rng.random() >= 0.3)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), hold_time(rng))


# -- the independent consumer ----------------------------------------------------------------


class StreamReader:
    """Reads everything the broker stored, in order, again and again (incrementally)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.problems: list[str] = []

    async def catch_up(self) -> None:
        raise NotImplementedError

    async def follow(self, every_s: float = 0.1) -> None:
        while True:
            with contextlib.suppress(*_TRANSIENT):
                await self.catch_up()
            await asyncio.sleep(every_s)

    def final_state(self, item: Item) -> str | None:
        state: str | None = None
        for event in self.events:
            if (event["_source_name"], event["subject"]) == item:
                state = None if kind(event) == "removed" else version(event)
        return state

    async def aclose(self) -> None:
        return None


_TRANSIENT = (
    nats.errors.Error,
    redis.exceptions.RedisError,
    OSError,
    TimeoutError,
)


class NatsStreamReader(StreamReader):
    """``STREAM.MSG.GET`` of every sequence number, from the first on."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.nc: NatsClient | None = None
        self.next_seq = 1

    async def catch_up(self) -> None:
        if self.nc is None:
            self.nc = await nats.connect(
                self.url.split(","),
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                error_cb=_quiet_errors,
            )
        js = self.nc.jetstream(timeout=2)
        try:
            info = await js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            return  # not created yet
        while self.next_seq <= info.state.last_seq:
            try:
                msg = await js.get_msg(STREAM, self.next_seq)
            except nats.js.errors.NotFoundError:
                self.problems.append(f"stream message {self.next_seq} is missing")
                self.next_seq += 1
                continue
            try:
                assert msg.subject is not None
                event = decode_nats(msg.subject, dict(msg.headers or {}), msg.data or b"")
                validate(event)
            except Exception as exc:  # reported by the checks, with the others
                self.problems.append(f"stream message {self.next_seq}: {exc!r}")
            else:
                self.events.append(event)
            self.next_seq += 1

    async def aclose(self) -> None:
        if self.nc is not None:
            await self.nc.close()


class RedisStreamReader(StreamReader):
    """``XRANGE`` of every source's stream, from its start on."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.client = redis_client(url, socket_timeout=2, socket_connect_timeout=2)
        self.last = dict.fromkeys(SOURCES, "-")

    async def catch_up(self) -> None:
        for source in SOURCES:
            while True:
                start = self.last[source]
                entries: list[tuple[bytes, dict[bytes, bytes]]]
                entries = await self.client.xrange(  # type: ignore[assignment]
                    f"koprs:external:{source}",
                    min=start if start == "-" else f"({start}",
                    count=500,
                )
                for entry_id, fields in entries:
                    self.last[source] = entry_id.decode()
                    try:
                        event = decode_redis(source, fields)
                        validate(event)
                    except Exception as exc:  # reported by the checks, with the others
                        self.problems.append(f"entry {entry_id!r} of {source}: {exc!r}")
                    else:
                        self.events.append(event)
                if len(entries) < 500:
                    break

    async def aclose(self) -> None:
        await self.client.aclose()


# -- the replicas ------------------------------------------------------------------------------


def replica_config(
    replica: str,
    *,
    broker_url: str,
    redis_url: str,
    world: World,
    s3: S3Server,
    stateless: bool = False,
    stream_replicas: int | None = None,
) -> dict[str, Any]:
    sources: list[dict[str, Any]] = []
    common = {"interval": INTERVAL_S, "max_backoff": MAX_BACKOFF_S}
    for name in HTTP_SOURCES:
        http = {"url": world.urls[name], "timeout": 2, "headers": {"X-Replica": replica}}
        sources.append({"name": name, **common, "http": http})
    for name in S3_SOURCES:
        bucket = {
            "bucket": world.bucket,
            "prefix": f"{name}/",
            "endpoint_url": s3.endpoint_url,
            "region": s3.region,
            "access_key_id": s3.access_key,
            "secret_access_key": s3.secret_key,
        }
        sources.append({"name": name, **common, "s3": bucket})
    broker: dict[str, Any] = {"url": broker_url, "ack_timeout": 2}
    if broker_url.startswith("nats"):
        broker["max_msgs_per_subject"] = 0  # keep every event: the check reads them all
    if stream_replicas is not None:  # the NATS cluster
        broker["replicas"] = stream_replicas
    if stateless:  # no leader election, no state: section: the state lives in memory only
        return {"broker": broker, "sources": sources}
    return {
        "broker": broker,
        "leader_election": {
            "redis_url": redis_url,
            "lease_ttl": LEASE_TTL_S,
            "renew_every": RENEW_EVERY_S,
        },
        "sources": sources,
    }


# -- faults ------------------------------------------------------------------------------------


@dataclass
class Chaos:
    """Everything a fault needs, and what the run observed."""

    rng: random.Random
    world: World
    replicas: Cluster
    redis_server: PersistentRedisServer | None
    """The election's single redis-server (None on a Redis Cluster or Sentinel set)."""
    nats_server: NatsServer | None
    reader: StreamReader
    redis: aioredis.Redis
    plan: list[str]
    stateless: bool = False
    """One replica, no state store (see the module docstring)."""
    nats_cluster: NatsCluster | None = None
    redis_topology: RedisClusterSet | SentinelSet | None = None
    """The Redis Cluster or Sentinel set of the ``redis-cluster`` / ``redis-sentinel`` runs:
    broker, leader election and checkpoints all on it."""
    faults: Faults = field(default_factory=Faults)
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        line = f"{time.monotonic() - self.started:7.2f}s {what}"
        self.log.append(line)
        print(line)

    async def held(self) -> dict[str, tuple[str, int]]:
        try:
            return await holders(self.redis, SOURCES)
        except (redis.exceptions.RedisError, OSError):
            return {}

    async def a_leader(self) -> str:
        """The replica leading a random source (a random replica if none leads)."""
        if self.stateless:
            return "r1"
        held = await self.held()
        if held:
            return held[self.rng.choice(sorted(held))][0]
        return self.rng.choice(REPLICAS)

    async def heartbeat(self, replica: str) -> float:
        """The replica's heartbeat expiry in Redis (-1 when absent or unreadable)."""
        try:
            score = await self.redis.zscore(replicas_key(prefix_for(self.redis)), replica)
        except (redis.exceptions.RedisError, OSError):
            return -1.0
        return -1.0 if score is None else float(score)

    # -- the faults --

    async def in_flight(self) -> tuple[str, str]:
        """Freeze nats-server, then wait for a leader to record a publish intent: (source,
        leader). That leader's publish now waits for acknowledgements, so it is between
        recording what it publishes and committing it, the window a crash must not lose nor
        double (its messages reach the stream when nats-server is thawed)."""
        assert self.nats_server is not None
        assert self.redis_server is not None
        await asyncio.to_thread(self.nats_server.pause)
        client = aioredis.from_url(self.redis_server.url)  # no socket timeout: it waits
        pubsub = client.pubsub()
        try:
            await client.config_set("notify-keyspace-events", "K$")
            await pubsub.psubscribe(f"__keyspace@0__:{REDIS_PREFIX}*:intent")
            deadline = time.monotonic() + RECOVERY_S
            while time.monotonic() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if message is None or message["data"] != b"set":
                    self.replicas.check_alive()
                    continue
                source = as_text(message["channel"]).partition("{")[2].partition("}")[0]
                token = await client.get(SourceKeys(source, REDIS_PREFIX).lease)
                if token is not None:
                    return source, as_text(token).rpartition("|")[0]
            pytest.fail(f"no publish intent recorded in {RECOVERY_S:g} s")
        except BaseException:
            self.nats_server.resume()
            raise
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
            await client.aclose()

    async def thaw_nats_later(self) -> None:
        """Thaw nats-server (frozen by :meth:`in_flight`) after a moment."""
        assert self.nats_server is not None
        try:
            await asyncio.sleep(self.rng.uniform(0.2, 0.8))
        finally:
            self.nats_server.resume()

    async def kill(self, fault: Fault, *, meanwhile: Awaitable[None] | None = None) -> None:
        """SIGKILL, then (after ``meanwhile``) a pause, then the same replica again."""
        victim = self.replicas[fault.target]
        await victim.kill()
        beat = await self.heartbeat(fault.target)
        down_s = self.rng.uniform(0.2, 1.5)
        self.note(f"killed {fault.target} (SIGKILL); restarting it in {down_s:.1f} s")
        if meanwhile is not None:
            await meanwhile
        await asyncio.sleep(down_s)
        since = victim.mark()
        await victim.start()

        async def joined() -> bool:
            if self.stateless:  # no heartbeats: its sources' loops started
                return logged(victim, r"publishing 4 source\(s\)", since)()
            return await self.heartbeat(fault.target) > beat

        await until(joined, f"{fault.target} to join again", replicas=self.replicas)

    async def pause(
        self, fault: Fault, *, past_the_lease: bool, meanwhile: Awaitable[None] | None = None
    ) -> None:
        replica = self.replicas[fault.target]
        replica.send(signal.SIGSTOP)
        paused_s = (
            self.rng.uniform(LEASE_TTL_S + 0.5, LEASE_TTL_S + 1.5)
            if past_the_lease
            else self.rng.uniform(0.3, LEASE_TTL_S - 0.8)
        )
        self.note(f"paused {fault.target} (SIGSTOP) for {paused_s:.1f} s")
        try:
            await asyncio.gather(asyncio.sleep(paused_s), meanwhile or asyncio.sleep(0))
        finally:
            replica.resume()

    async def pause_server(self, fault: Fault) -> None:
        server = self._server(fault.target)
        paused_s = self.rng.uniform(0.3, 3.0)
        self.note(f"pausing {fault.target} (SIGSTOP) for {paused_s:.1f} s")
        await asyncio.to_thread(server.pause)
        try:
            await asyncio.sleep(paused_s)
        finally:
            server.resume()

    async def restart_server(self, fault: Fault) -> None:
        server = self._server(fault.target)
        down_s = self.rng.uniform(0.2, 2.5)
        self.note(f"stopping {fault.target} for {down_s:.1f} s")
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(server.start)

    async def kill_nats_node(self, fault: Fault, node: NatsServer) -> None:
        """SIGKILL a NATS node, start it again (its store kept) after a moment."""
        assert self.nats_cluster is not None
        down_s = self.rng.uniform(0.5, 3.0)
        self.note(f"killed NATS node {fault.target} (SIGKILL); restarting it in {down_s:.1f} s")
        await asyncio.to_thread(kill_server, node)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(node.start)
        await asyncio.to_thread(self.nats_cluster.wait_healthy)

    async def kill_redis_primary(self, fault: Fault, key: str) -> None:
        """SIGKILL the Redis primary owning ``key`` (Cluster) or the Sentinel set's primary,
        wait until its replica took over, start the killed node again after a moment (it
        comes back as a replica) and wait until the set is healthy again."""
        topology = self.redis_topology
        assert topology is not None
        down_s = self.rng.uniform(0.5, 2.0)
        if isinstance(topology, RedisClusterSet):
            _old, new = await asyncio.to_thread(topology.fail_over, key)
        else:
            _old, new = await asyncio.to_thread(topology.fail_over)
        self.note(
            f"killed Redis primary {fault.target} (SIGKILL); redis-{new.port} promoted "
            f"{time.monotonic() - fault.start:.2f} s after the kill; restarting the killed "
            f"node in {down_s:.1f} s"
        )
        await asyncio.sleep(down_s)
        await asyncio.to_thread(topology.restore)

    async def pause_redis_primary(self, fault: Fault, key: str) -> None:
        """SIGSTOP the Redis primary owning ``key`` until its replica was promoted, then
        SIGCONT it: it comes back believing it is the primary, with the bridge's connections
        to it still open, until the cluster (gossip) or the sentinels demote it. A write it
        takes meanwhile is lost when it becomes a replica: it must never have counted."""
        topology = self.redis_topology
        assert topology is not None
        old = await asyncio.to_thread(_primary_of, topology, key)
        await asyncio.to_thread(old.pause)
        try:

            def promoted() -> bool:
                with contextlib.suppress(AssertionError, ServerError):
                    return _primary_of(topology, key) is not old
                return False

            await asyncio.to_thread(wait_until, promoted, "a replica promoted", RECOVERY_S)
            self.note(
                f"paused Redis primary {fault.target} (SIGSTOP); a replica promoted "
                f"{time.monotonic() - fault.start:.2f} s later; resuming the old primary"
            )
        finally:
            old.resume()
        await asyncio.to_thread(topology.wait_healthy)

    def _server(self, name: str) -> ServerProcess:
        if name == "nats-server":
            assert self.nats_server is not None
            return self.nats_server
        assert self.redis_server is not None
        return self.redis_server

    async def inject(self, kind_: str) -> None:
        """One fault, from its start until the system recovered from it."""
        started = time.monotonic()
        meanwhile: Awaitable[None] | None = None
        source = ""
        if kind_.endswith("-in-flight") and self.stateless:
            # no intent to wait for: freeze nats-server for more than a poll interval while
            # the items keep changing, so a publish is most likely waiting for its acks
            assert self.nats_server is not None
            await asyncio.to_thread(self.nats_server.pause)
            try:
                await asyncio.sleep(self.rng.uniform(2 * INTERVAL_S, 4 * INTERVAL_S))
            except BaseException:
                self.nats_server.resume()
                raise
            source, target = "", "r1"
            self.note("nats-server frozen for a while; r1 most likely waits for acks")
            meanwhile = self.thaw_nats_later()
        elif kind_.endswith("-in-flight"):
            source, target = await self.in_flight()
            meanwhile = self.thaw_nats_later()
        elif kind_ in ("kill", "pause"):
            target = await self.a_leader()
        elif kind_ in ("kill-stream-leader", "kill-node"):
            assert self.nats_cluster is not None
            node = (
                await asyncio.to_thread(self.nats_cluster.wait_stream_leader, STREAM)
                if kind_ == "kill-stream-leader"
                else self.rng.choice(self.nats_cluster.nodes)
            )
            target = f"nats-{node.port}"
        elif kind_ in (
            "kill-stream-primary",
            "kill-lease-primary",
            "kill-primary",
            "pause-primary",
        ):
            topology = self.redis_topology
            assert topology is not None
            source = self.rng.choice(SOURCES)
            key = (
                SourceKeys(source, prefix_for(self.redis)).lease
                if kind_ in ("kill-lease-primary", "pause-primary")
                else redis_stream_key(source)
            )
            primary = await asyncio.to_thread(_primary_of, topology, key)
            target = f"redis-{primary.port}"
            source = ""  # not a publish in flight
        elif kind_ == "pause-server":
            target = (
                self.rng.choice(["redis-server", "nats-server"])
                if self.nats_server
                else "redis-server"
            )
        else:
            target = kind_.removeprefix("restart-") + "-server"
        fault = self.faults.open(kind_, target, started)
        if source:
            self.note(f"nats-server frozen; {source}'s leader {target} recorded a publish intent")
        if kind_ in ("kill-stream-leader", "kill-node"):
            await self.kill_nats_node(fault, node)
        elif kind_ in ("kill-stream-primary", "kill-lease-primary", "kill-primary"):
            await self.kill_redis_primary(fault, key)
        elif kind_ == "pause-primary":
            await self.pause_redis_primary(fault, key)
        elif kind_.startswith("kill"):
            await self.kill(fault, meanwhile=meanwhile)
        elif kind_ in ("pause", "pause-in-flight"):
            past_the_lease = kind_ == "pause-in-flight" or self.rng.random() < 0.5
            await self.pause(fault, past_the_lease=past_the_lease, meanwhile=meanwhile)
        elif kind_ == "pause-server":
            await self.pause_server(fault)
        else:
            await self.restart_server(fault)
        fault.lifted = time.monotonic()
        await self.recovered(fault)
        self.note(
            f"{kind_} of {target}: recovered {fault.end - fault.lifted:.2f} s after it was "
            f"lifted ({fault.end - fault.start:.2f} s in all)"
        )

    async def run(self) -> None:
        """Start-up, then every fault in a seeded order with quiet times between, while the
        sources change; then wait until the consumer has every item's final state."""
        startup = self.faults.open("startup", "all replicas", self.started)
        if not await self.converged():
            self.note("the initial states did not all reach the consumer; checking what did")
            return
        await self.leased(startup)
        startup.lifted = startup.end = time.monotonic()
        self.note(f"{len(self.replicas.replicas)} replica(s) up, every initial state published")

        stop = asyncio.Event()
        changers = [
            asyncio.create_task(
                keep_changing(self.world, item, random.Random(self.rng.random()), stop)
            )
            for item in self.world.items
        ]
        try:
            for kind_ in self.plan:
                await self.quiet(self.rng.uniform(1.8, 2.6))
                await self.inject(kind_)
            await self.quiet(self.rng.uniform(1.8, 2.6))
        finally:
            stop.set()
            await asyncio.gather(*changers)
        self.note(f"changes stopped after {self.world.truth.changes} changes")
        if not await self.converged():
            self.note("the consumer's state did not reach the truth; checking what it got")
            return
        docs = self.world.docs
        polls = {name: len(docs.requests(name)) for name in HTTP_SOURCES}
        await until(  # a few more rounds, so that a late copy of anything would show
            lambda: all(len(docs.requests(n)) >= polls[n] + 3 for n in HTTP_SOURCES),
            "3 more polls of every HTTP source",
            replicas=self.replicas,
        )
        self.note("the consumer has the final state of every item")

    async def caught_up(self, live: Received) -> None:
        """Wait (bounded) until the live consumer has as many events as the stream."""
        count = len(self.reader.events)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RECOVERY_S):
                await live.wait_for(lambda events: len(events) >= count)

    async def converged(self) -> bool:
        """Wait (bounded) until the consumer's state of every item is the item's true state."""
        truth = self.world.truth
        deadline = time.monotonic() + RECOVERY_S
        while any(self.reader.final_state(i) != truth.current(i) for i in self.world.items):
            if time.monotonic() > deadline:
                return False
            await self.quiet(0.1)
        return True

    async def quiet(self, seconds: float) -> None:
        """Let the system run undisturbed, failing early if a replica died."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.replicas.check_alive()
            await asyncio.sleep(min(0.2, left))

    async def leased(self, fault: Fault) -> None:
        """Wait until every source is leased, no replica above its fair share."""
        if self.stateless:  # nothing is leased: the one replica must be alive
            self.replicas.check_alive()
            return

        async def stable() -> bool:
            held = await self.held()
            spread = Counter(replica for replica, _ in held.values())
            return len(held) == len(SOURCES) and max(spread.values()) <= SHARE

        await until(
            stable,
            f"every source leased after {fault.kind} of {fault.target}",
            replicas=self.replicas,
            timeout_s=RECOVERY_S,
        )

    async def recovered(self, fault: Fault) -> None:
        """Wait until every source is leased within the fair share and has published a version
        made after that; then the fault's window ends."""
        await self.leased(fault)
        settled = time.monotonic()

        def published_since() -> bool:
            fresh = {
                e["_source_name"] for e in self.reader.events if self.world.made_after(e, settled)
            }
            return fresh >= set(SOURCES)

        await until(
            published_since,
            f"every source to publish again after {fault.kind} of {fault.target}",
            replicas=self.replicas,
            timeout_s=RECOVERY_S,
        )
        fault.end = time.monotonic()


def _primary_of(topology: RedisClusterSet | SentinelSet, key: str) -> ServerProcess:
    """The running primary owning ``key`` (a Sentinel set's one primary owns every key)."""
    if isinstance(topology, RedisClusterSet):
        return topology.primary_for(key)
    primary = topology.current_primary()
    if primary is None:
        raise AssertionError("the sentinels do not agree on a primary")
    return primary


# -- the run -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(task: Awaitable[None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``task`` in the background; cancel it on exit."""
    background = asyncio.ensure_future(task)
    try:
        yield background
    finally:
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await background


async def _quiet_errors(exc: Exception) -> None:
    """nats-py's error callback: reconnections are expected here, not worth a log line."""


@contextlib.asynccontextmanager
async def live_consumer(broker: Broker, url: str) -> AsyncIterator[Received | None]:
    """On NATS, an ordered push consumer of the whole stream (heartbeats every second, so it
    notices a restarted server and resumes after the last message it got)."""
    if broker.startswith("redis"):
        yield None
        return
    received = Received()
    nc = await nats.connect(
        url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet_errors
    )

    async def on_message(msg: Msg) -> None:
        await received.add(decode_nats(msg.subject, msg.headers, msg.data))

    try:
        js = nc.jetstream()
        while True:  # the first replica to connect creates the stream
            with contextlib.suppress(nats.js.errors.NotFoundError):
                sub = await js.subscribe(
                    "koprs.external.>",
                    cb=on_message,
                    deliver_policy=DeliverPolicy.ALL,
                    ordered_consumer=True,
                    idle_heartbeat=1.0,
                )
                break
            await asyncio.sleep(0.05)
        try:
            yield received
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


async def run_chaos(
    broker: Broker,
    seed: int,
    *,
    s3: S3Server,
    bucket: str,
    tmp_path: Path,
    stateless: bool = False,
) -> None:
    rng = random.Random(seed)
    names = ("r1",) if stateless else REPLICAS
    variant = f"{broker}, no state store" if stateless else broker
    print(f"\nchaos seed {seed} ({variant}); rerun with KOPRS_CHAOS_SEED={seed}")
    began = time.monotonic()
    with contextlib.ExitStack() as servers:
        redis_topology: RedisClusterSet | SentinelSet | None = None
        if broker in ("redis-cluster", "redis-sentinel"):
            redis_topology = RedisClusterSet() if broker == "redis-cluster" else SentinelSet()
            servers.callback(redis_topology.close)
            await asyncio.to_thread(redis_topology.start)
        redis_server = (
            servers.enter_context(PersistentRedisServer()) if redis_topology is None else None
        )
        redis_url = redis_topology.url if redis_topology else _given(redis_server).url
        nats_server = servers.enter_context(NatsServer()) if broker == "nats" else None
        nats_cluster = None
        if broker == "nats-cluster":
            nats_cluster = NatsCluster()
            servers.callback(nats_cluster.close)
            await asyncio.to_thread(nats_cluster.start)
        docs = servers.enter_context(Documents())
        world = World(docs, s3, bucket, seed)
        broker_url = (
            nats_server.url if nats_server else nats_cluster.url if nats_cluster else redis_url
        )
        reader: StreamReader = (
            RedisStreamReader(broker_url)
            if broker.startswith("redis")
            else NatsStreamReader(broker_url)
        )

        def config_for(replica: str) -> dict[str, Any]:
            return replica_config(
                replica,
                broker_url=broker_url,
                redis_url=redis_url,
                world=world,
                s3=s3,
                stateless=stateless,
                stream_replicas=3 if nats_cluster else None,
            )

        for item in world.items:  # the initial states, most items present
            if rng.random() < 0.8:
                await world.change(item, present=True)
        redis = redis_client(redis_url, socket_timeout=1, socket_connect_timeout=1)
        try:
            async with cluster(tmp_path, config_for) as replicas, running(reader.follow()):
                plan = fault_plan(broker, seed, stateless=stateless)
                chaos = Chaos(
                    rng, world, replicas, redis_server, nats_server, reader, redis, plan,
                    stateless, nats_cluster=nats_cluster, redis_topology=redis_topology,
                )  # fmt: skip
                await replicas.start(*names)
                async with live_consumer(broker, broker_url) as live:
                    await chaos.run()
                    codes = await replicas.stop_all()
                    await reader.catch_up()
                    if live is not None:  # the live consumer may lag after a server restart
                        await chaos.caught_up(live)
                    replays = sum(
                        r.count("republishing an unsettled batch")
                        for r in replicas.replicas.values()
                    )
                    live_events = list(live.events) if live is not None else None
                    unplanned = unplanned_handovers(replicas, chaos.faults)
        finally:
            await redis.aclose()
            await reader.aclose()

    assert codes == dict.fromkeys(names, 0), f"a replica did not exit cleanly: {codes}"
    report = check(world, chaos.faults, reader, live_events)
    kinds = STATELESS_FAULTS if stateless else FAULTS[broker]
    survived = Counter(f.kind for f in chaos.faults.windows if f.kind in kinds)
    line = (
        f"chaos {variant} seed {seed}: survived "
        + ", ".join(f"{n} {k}" for k, n in sorted(survived.items()))
        + f" ({replays} unsettled batch(es) republished by a new leader, {unplanned} unplanned "
        f"lease hand-over(s)); {world.truth.changes} changes, {report}; "
        f"{time.monotonic() - began:.0f} s"
    )
    print(line)
    REPORTS.append(line)


def _given(server: PersistentRedisServer | None) -> PersistentRedisServer:
    assert server is not None
    return server


_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?(lost the lease on source|stopping source \S+ at once|giving up source)"
)


def unplanned_handovers(replicas: Cluster, faults: Faults) -> int:
    """Add a fault window around every lease loss or give-up a replica logged outside the
    injected faults (a replica starved of CPU past its lease TTL, on a busy machine): while a
    source changes hands no replica leads it. Returns how many there were."""
    offset = time.time() - time.monotonic()
    injected = list(faults.windows)
    found = 0
    for replica in replicas.replicas.values():
        for line in replica.log().splitlines():
            match = _LOG_LINE.match(line)
            if match is None:
                continue
            wall = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            at = wall - offset
            if any(f.start <= at <= f.end for f in injected):
                continue
            found += 1
            fault = faults.open(f"unplanned hand-over ({match[2]})", replica.name, at - LEASE_TTL_S)
            fault.lifted = at
            fault.end = at + LEASE_TTL_S + 1.0
    return found


def check(world: World, faults: Faults, reader: StreamReader, live: list[Event] | None) -> str:
    """Every assertion of the run; returns the counts checked."""
    events = reader.events
    assert reader.problems == []
    ids = Counter(e["id"] for e in events)
    assert [i for i, n in ids.items() if n > 1] == [], "an event id was delivered twice"
    if live is not None:
        assert [e["id"] for e in live] == [e["id"] for e in events], (
            "the live consumer did not get exactly the stream's messages, in order"
        )
    unknown = {(e["_source_name"], e["subject"]) for e in events} - set(world.items)
    assert unknown == set(), f"events of items that do not exist: {unknown}"
    errors: list[str] = []
    must = skipped = 0
    for item in world.items:
        delivered = [
            Delivered(kind(e), version(e), e["id"])
            for e in events
            if (e["_source_name"], e["subject"]) == item
        ]
        report = check_item(item, world.truth.items[item], delivered, faults.windows, hold_s=HOLD_S)
        must += report.must
        skipped += report.skipped
        errors += [f"{item[0]} {item[1]}: {problem}" for problem in report.errors]
        if report.errors:  # what the stream holds for it, and the truth, to see what went wrong
            errors.append(f"  delivered: {[(d.kind, d.version) for d in delivered]}")
            errors.append(f"  truth: {world.truth.items[item]}")
    if errors:
        zero = faults.windows[0].start
        windows = "\n".join(
            f"  {f.kind} of {f.target}: {f.start - zero:.2f} s, lifted {f.lifted - zero:.2f} s, "
            f"recovered {f.end - zero:.2f} s"
            for f in faults.windows
        )
        pytest.fail("\n".join(errors) + f"\nfault windows:\n{windows}", pytrace=False)
    return (
        f"{len(events)} events checked, {must} states that had to arrive did, "
        f"{skipped} short or faulted states skipped"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", seeds(NATS_SEEDS), ids=lambda s: f"seed{s}")
async def test_chaos_nats(seed: int, s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    await run_chaos("nats", seed, s3=s3_server, bucket=s3_bucket, tmp_path=tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", seeds(REDIS_SEEDS), ids=lambda s: f"seed{s}")
async def test_chaos_redis_streams(
    seed: int, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    await run_chaos("redis", seed, s3=s3_server, bucket=s3_bucket, tmp_path=tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", seeds(STATELESS_SEEDS), ids=lambda s: f"seed{s}")
async def test_chaos_nats_without_state_store(
    seed: int, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    await run_chaos("nats", seed, s3=s3_server, bucket=s3_bucket, tmp_path=tmp_path, stateless=True)


@pytest.mark.timeout(300)
@pytest.mark.clusters
@pytest.mark.parametrize("seed", seeds(NATS_CLUSTER_SEEDS), ids=lambda s: f"seed{s}")
async def test_chaos_nats_cluster(
    seed: int, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Replicas killed and paused, the stream leader's node and other nodes killed, on a
    3-node cluster with an R3 stream."""
    await run_chaos("nats-cluster", seed, s3=s3_server, bucket=s3_bucket, tmp_path=tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.clusters
@pytest.mark.parametrize("seed", seeds(REDIS_CLUSTER_SEEDS), ids=lambda s: f"seed{s}")
async def test_chaos_redis_cluster(
    seed: int, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Replicas killed and paused, the Redis Cluster primary owning a source's stream slot or
    the election's slot (leases, fences, checkpoints) killed: its replica is promoted. Broker,
    leader election and checkpoints all on one Redis Cluster of 3 primaries + 3 replicas."""
    await run_chaos("redis-cluster", seed, s3=s3_server, bucket=s3_bucket, tmp_path=tmp_path)


@pytest.mark.timeout(300)
@pytest.mark.clusters
@pytest.mark.parametrize("seed", seeds(REDIS_SENTINEL_SEEDS), ids=lambda s: f"seed{s}")
async def test_chaos_redis_sentinel(
    seed: int, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Replicas killed and paused, the Sentinel set's primary killed: the sentinels promote
    the replica. Broker, leader election and checkpoints all behind the sentinels."""
    await run_chaos("redis-sentinel", seed, s3=s3_server, bucket=s3_bucket, tmp_path=tmp_path)


@pytest.mark.parametrize(
    ("broker", "fixed"),
    [
        ("nats", NATS_SEEDS),
        ("redis", REDIS_SEEDS),
        ("nats-cluster", NATS_CLUSTER_SEEDS),
        ("redis-cluster", REDIS_CLUSTER_SEEDS),
        ("redis-sentinel", REDIS_SENTINEL_SEEDS),
    ],
)
def test_the_fixed_seeds_inject_every_kind_of_fault(broker: Broker, fixed: Sequence[int]) -> None:
    planned = {k for seed in fixed for k in fault_plan(broker, seed, FAULTS_PER_RUN[broker])}
    assert planned == set(FAULTS[broker])


def test_the_fixed_seed_without_state_store_injects_every_kind_of_fault() -> None:
    planned = {k for seed in STATELESS_SEEDS for k in fault_plan("nats", seed, 4, stateless=True)}
    assert planned == set(STATELESS_FAULTS)
