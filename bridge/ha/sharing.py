"""Fair sharing of sources between replicas, each source led by the holder of its lease.

Every ``period`` (a third of the lease TTL by default) a replica:

1. heartbeats: ``ZADD koprs:bridge:replicas <expiry> <replica>`` and drops expired members
   (by the Redis server's clock), which gives the number of live replicas ``n``;
2. computes its share, ``ceil(sources / n)``;
3. gives up leases above its share (the source's loop is stopped, then the lease released),
   so a replica that just joined finds free sources;
4. tries to acquire free sources (``SET NX``) until it holds its share, starting at a point
   that depends on its id so replicas do not all race for the same source. When it is below
   its share and a lease it tried is held, its next round comes as that lease expires rather
   than a full period later: a dead leader's sources are taken over within the TTL.

A held source runs in a task that also renews the lease; when the lease is lost (renewal
refused, Redis unreachable past the TTL, a fenced write refused) the source's loop is
cancelled at once and the replica keeps going: it competes again at its next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from bridge import aio
from bridge.errors import BridgeError
from bridge.ha.checkpoints import RedisStateStore
from bridge.ha.keys import SourceKeys, as_text, replicas_key
from bridge.ha.leases import Lease, LeaseClient
from bridge.service.delivery import PublishedCallback, SourceLoop, SourceSpec, stop_loops
from bridge.sinks import Sink
from bridge.telemetry.service import Telemetry

__all__ = ["Coordinator"]

log = logging.getLogger("bridge.ha")

_HEARTBEAT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
return redis.call('ZCARD', KEYS[1])
"""


@dataclass(eq=False)
class _Led:
    lease: Lease
    loop: SourceLoop
    task: asyncio.Task[None]


class Coordinator:
    """Leads this replica's fair share of ``specs``; see the module docstring."""

    def __init__(
        self,
        specs: Sequence[SourceSpec],
        sink: Sink,
        redis: aioredis.Redis,
        *,
        replica: str,
        lease_ttl_s: float,
        renew_every_s: float | None = None,
        prefix: str = "koprs:bridge:",
        on_published: PublishedCallback | None = None,
        shutdown_grace_s: float = 5.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.sink = sink
        self.redis = redis
        self.replica = replica
        self.period_s = renew_every_s or lease_ttl_s / 3
        self.lease_ttl_s = lease_ttl_s
        self.prefix = prefix
        self.on_published = on_published
        self.shutdown_grace_s = shutdown_grace_s
        self.telemetry = telemetry
        self.leases = LeaseClient(redis, replica, ttl_s=lease_ttl_s, prefix=prefix)
        self.held: dict[str, Lease] = {}
        self.state = RedisStateStore(redis, self.held)
        self.led: dict[str, _Led] = {}
        self._leaving: set[asyncio.Task[None]] = set()
        self.live_replicas = 0
        self.rounds = 0
        self._round_done = asyncio.Condition()
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._order = self._acquisition_order()
        self._lock = asyncio.Lock()
        """Held by a round and by :meth:`update`, so the set of sources never changes mid-round."""
        self._running = False
        self._retry_in_s: float | None = None
        """When the next round should come early (a held lease it wants expires by then)."""

    def _acquisition_order(self) -> list[str]:
        start = zlib.crc32(self.replica.encode()) % max(1, len(self.specs))
        names = sorted(self.specs)
        return names[start:] + names[:start]

    @property
    def share(self) -> int:
        return math.ceil(len(self.specs) / max(1, self.live_replicas))

    async def run(self, stop: asyncio.Event) -> None:
        """Coordinate until ``stop`` is set; then stop every led source and release its lease."""
        self._running = True
        try:
            while not stop.is_set():
                async with self._lock:
                    await self._try_round()
                async with self._round_done:
                    self.rounds += 1
                    self._round_done.notify_all()
                wait_s = self.period_s
                if self._retry_in_s is not None:  # +10 ms: Redis has expired the key by then
                    wait_s = min(wait_s, self._retry_in_s + 0.01)
                await aio.sleep(wait_s, stop)
        finally:
            async with self._lock:
                self._running = False
                leaving = [self._give_up(self.led.pop(name)) for name in list(self.led)]
                await asyncio.gather(*leaving, *self._leaving)
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await asyncio.shield(self.redis.zrem(replicas_key(self.prefix), self.replica))

    async def _try_round(self) -> None:
        try:
            await self.round()
        except (BridgeError, redis.exceptions.RedisError, OSError) as exc:
            log.warning("leader election round failed (Redis unreachable?): %s", exc)

    async def update(self, specs: Sequence[SourceSpec]) -> None:
        """Replace the set of sources competed for (a config reload), matched by name.

        A source that is gone, or whose spec is another object (changed), stops being led if
        it was: its loop stops (a publish in flight finishes, within ``shutdown_grace_s``) and
        its lease is released. When this returns, no loop of a replaced spec runs any more.
        Then, if :meth:`run` is running, a round takes new (and changed) sources at once,
        within this replica's share. Specs that are the same objects are left alone.
        """
        new = {spec.name: spec for spec in specs}
        async with self._lock:
            leaving = [
                self._give_up(self.led.pop(name))
                for name in list(self.led)
                if new.get(name) is not self.specs.get(name)
            ]
            for name in sorted(self.specs.keys() - new.keys()):
                log.info("source %r removed from the config: no longer competing for it", name)
            await asyncio.gather(*leaving, *self._leaving)
            self.specs = new
            self._order = self._acquisition_order()
            if self._running:
                await self._try_round()

    async def wait_for_rounds(self, rounds: int) -> None:
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= rounds)

    async def round(self) -> None:
        """One heartbeat-and-rebalance round."""
        for name, led in list(self.led.items()):  # forget sources whose lease was lost
            if led.task.done():
                self.led.pop(name)
                self.held.pop(name, None)
        ttl_ms = int(self.lease_ttl_s * 1000)
        self.live_replicas = int(
            await self._heartbeat(keys=[replicas_key(self.prefix)], args=[self.replica, ttl_ms])
        )
        share = self.share
        extra = len(self.led) - share
        if extra > 0:
            for name in sorted(self.led, reverse=True)[:extra]:
                log.info(
                    "giving up source %r: %d live replicas, share %d",
                    name,
                    self.live_replicas,
                    share,
                )
                # In the background: a publish in flight may take up to the grace period,
                # and the heartbeat of this round must not wait for it.
                task = asyncio.create_task(self._give_up(self.led.pop(name)))
                self._leaving.add(task)
                task.add_done_callback(self._leaving.discard)
        self._retry_in_s = None
        for name in self._order:
            if len(self.led) >= share:
                break
            if name in self.led:
                continue
            lease = await self.leases.acquire(name)
            if lease is not None:
                self._lead(self.specs[name], lease)
            elif (free_in := self.leases.free_in_s) is not None:
                soonest: float | None = self._retry_in_s
                self._retry_in_s = free_in if soonest is None else min(free_in, soonest)

    def _lead(self, spec: SourceSpec, lease: Lease) -> None:
        self.held[spec.name] = lease
        loop = SourceLoop(
            spec,
            self.sink,
            self.state,
            on_published=self.on_published,
            guard=lease.check,
            telemetry=self.telemetry.source(spec.name) if self.telemetry else None,
        )
        loop.telemetry.set_lease_held(True)
        task = asyncio.create_task(self._run_led(lease, loop), name=f"lead:{spec.name}")
        self.led[spec.name] = _Led(lease, loop, task)

    async def _run_led(self, lease: Lease, loop: SourceLoop) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:  # the loop and its lease live together
                keeper = tasks.create_task(self.leases.keep(lease, self.period_s))
                runner = tasks.create_task(
                    self._run_loop(lease, loop), name=f"source:{lease.source}"
                )
                lost = tasks.create_task(lease.lost.wait())
                try:
                    await asyncio.wait([runner, lost], return_when=asyncio.FIRST_COMPLETED)
                    if lease.lost.is_set():
                        log.warning("stopping source %r at once: its lease is lost", lease.source)
                finally:
                    # Also stop both without relying on the cancellations: on Python 3.11 a
                    # cancellation can be swallowed (asyncio.wait_for, used by redis-py), and
                    # a keeper that survives it would renew the lease of a source nobody leads.
                    lease.lost.set()
                    loop.telemetry.set_lease_held(False)
                    loop.stop()
                    for task in (runner, keeper, lost):
                        task.cancel()
        finally:
            self.held.pop(lease.source, None)
            await self.leases.release(lease)

    @staticmethod
    async def _run_loop(lease: Lease, loop: SourceLoop) -> None:
        """The source's loop; its death is logged here (it does not end the lease's group)."""
        try:
            await loop.run()
        except Exception as exc:
            if not lease.lost.is_set():
                log.error("source %r stopped unexpectedly", lease.source, exc_info=exc)

    async def _give_up(self, led: _Led) -> None:
        """Stop leading a source: let a publish in flight finish (bounded), release the lease."""
        await stop_loops([(led.loop, led.task)], self.shutdown_grace_s)

    def status(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "live_replicas": self.live_replicas,
            "share": self.share,
            "leading": {
                name: {"fence": led.lease.fence, **led.loop.status()}
                for name, led in sorted(self.led.items())
            },
        }


async def election_status(
    redis: aioredis.Redis, sources: Sequence[str], prefix: str = "koprs:bridge:"
) -> dict[str, Any]:
    """Who holds which source, read from Redis (for ``koprs-bridge status``)."""
    now_s, now_us = await redis.time()
    now_ms = now_s * 1000 + now_us // 1000
    replicas = await redis.zrangebyscore(replicas_key(prefix), now_ms, "+inf")
    holders: dict[str, Any] = {}
    for name in sources:
        keys = SourceKeys(name, prefix)
        token = await redis.get(keys.lease)
        revision = await redis.hget(keys.meta, "revision")
        holder, _, fence = (as_text(token) if token else "").rpartition("|")
        holders[name] = {
            "holder": holder or None,
            "fence": int(fence) if fence else None,
            "revision": int(revision) if revision else None,
        }
    return {"replicas": sorted(as_text(r) for r in replicas), "sources": holders}
