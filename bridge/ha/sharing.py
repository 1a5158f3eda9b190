"""Fair sharing of sources between replicas, each source led by the holder of its lease.

Every ``period`` (a third of the lease TTL by default) a replica makes one round:

1. heartbeat, one script (see :meth:`~bridge.ha.leases.LeaseClient.heartbeat`): renew this
   replica's membership in ``koprs:bridge:replicas`` (which keeps every lease it holds alive),
   drop expired members (by the Redis server's clock), and read back every source's lease key.
   That gives the live replicas ``n``, and which held lease is no longer ours (stopped at once);
2. compute its share, ``ceil(sources / n)``;
3. give up leases above its share (the source's loop is stopped, then the lease released),
   so a replica that just joined finds free sources;
4. acquire free sources (no lease key, or one whose holder is no longer a live member) until
   it holds its share, in batches of one script, starting at a point that depends on its id so
   replicas do not all race for the same source. The next round comes early when another
   member's membership (or a lease with a TTL of its own) runs out before the period ends:
   a dead leader's sources are taken over within the TTL.

Steady state costs one round trip and about ``5 + sources / 1000`` Redis commands per replica
and period, whatever the number of sources. A dedicated connection carries the heartbeats, so
state writes queued on the main pool never delay them. When the membership could not be
renewed before its deadline (by the local clock), every lease is lost at once; a held source
runs in a task that is cancelled as soon as its lease is lost (membership lapsed, taken by
another replica, a fenced write refused) and the replica keeps going: it competes again at
its next round. Shutdown gives back every lease and the membership in one script.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from bridge import aio
from bridge.connections_redis import is_cluster
from bridge.errors import BridgeError
from bridge.ha.checkpoints import RedisStateStore
from bridge.ha.keys import SourceKeys, as_text, prefix_for, replicas_key
from bridge.ha.leases import Lease, LeaseClient
from bridge.ha.replication import Replication
from bridge.service.delivery import PublishedCallback, SourceLoop, SourceSpec, stop_loops
from bridge.sinks import Sink
from bridge.telemetry.service import Telemetry
from bridge.watching import Lag, start_offset_s

__all__ = ["Coordinator", "control_client"]

log = logging.getLogger("bridge.ha")


def control_client(redis: aioredis.Redis) -> aioredis.Redis:
    """A client on its own one-connection pool, to the same server as ``redis`` (a Sentinel
    client's pool asks the sentinels for the primary at each connection). A Redis Cluster
    client is returned as is: its pools are per node and never block."""
    if is_cluster(redis):
        return redis
    pool = redis.connection_pool
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool(
            connection_class=pool.connection_class,
            max_connections=1,
            timeout=None,
            **pool.connection_kwargs,
        )
    )


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
        slots: asyncio.Semaphore | None = None,
        lag: Lag | None = None,
        rng: random.Random | None = None,
        replication: Replication | None = None,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.slots = slots
        self.lag = lag
        self.rng = rng
        self.sink = sink
        self.redis = redis
        """State writes (checkpoints) go through this client's pool."""
        prefix = prefix_for(redis, prefix)  # Redis Cluster: all election keys in one slot
        self.control = control_client(redis)
        """Heartbeats, acquisitions and releases go through this one (one connection)."""
        self.replica = replica
        self.period_s = renew_every_s or lease_ttl_s / 3
        self.lease_ttl_s = lease_ttl_s
        self.prefix = prefix
        self.on_published = on_published
        self.shutdown_grace_s = shutdown_grace_s
        self.telemetry = telemetry
        self.leases = LeaseClient(
            self.control, replica, ttl_s=lease_ttl_s, prefix=prefix, replication=replication
        )
        self.held: dict[str, Lease] = {}
        self.state = RedisStateStore(redis, self.held, replication)
        self.led: dict[str, _Led] = {}
        self._leaving: set[asyncio.Task[None]] = set()
        self._giving_up: dict[str, _Led] = {}
        """Sources given up by a rebalance whose loop (a publish in flight) and release are not
        done yet: not free for this replica until then, and lost with the membership too."""
        self.live_replicas = 0
        self.rounds = 0
        self._round_done = asyncio.Condition()
        self._order = self._acquisition_order()
        self._lock = asyncio.Lock()
        """Held by a round and by :meth:`update`, so the set of sources never changes mid-round."""
        self._running = False
        self._released_together: set[Lease] = set()
        """At shutdown: the leases :meth:`run` gives back in one script, not one by one."""
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
        """Coordinate until ``stop`` is set; then stop every led source and give back every
        lease and the membership (one script)."""
        self._running = True
        watchdog = asyncio.create_task(self._watch_membership(), name="membership-watchdog")
        try:
            while not stop.is_set():
                async with self._lock:
                    await self._try_round()
                async with self._round_done:
                    self.rounds += 1
                    self._round_done.notify_all()
                wait_s = self.period_s
                if self._retry_in_s is not None:  # +10 ms: Redis has expired it by then
                    wait_s = min(wait_s, self._retry_in_s + 0.01)
                await aio.sleep(wait_s, stop)
        finally:
            watchdog.cancel()
            async with self._lock:
                self._running = False
                held = [led.lease for led in self.led.values() if not led.lease.lost.is_set()]
                self._released_together.update(held)
                leaving = [self._give_up(self.led.pop(name)) for name in list(self.led)]
                await asyncio.gather(*leaving, *self._leaving, watchdog, return_exceptions=True)
                await self.leases.release_all(held)
                self._released_together.clear()
            if self.control is not self.redis:  # a cluster client is shared: closed by its owner
                await self.control.aclose()

    async def _watch_membership(self) -> None:
        """Lose every lease as soon as the membership's deadline passes unrenewed."""
        membership = self.leases.membership
        while True:
            left_s = membership.deadline - time.monotonic()
            if left_s > 0:
                await asyncio.sleep(left_s)
                continue
            for led in [*self.led.values(), *self._giving_up.values()]:
                self.leases.lose(led.lease, "its replica's membership could not be renewed")
            await asyncio.sleep(self.period_s / 4)

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
                if self.held.get(name) is led.lease:
                    del self.held[name]
        beat = await self.leases.heartbeat(self._order)
        for name, led in [*self.led.items(), *self._giving_up.items()]:
            if beat.tokens.get(name) != led.lease.token:
                self.leases.lose(led.lease, "another replica holds it now")
        self.live_replicas = len(beat.live)
        orphans = [
            Lease(SourceKeys(name, self.leases.prefix), self.replica, int(fence), self.lease_ttl_s)
            for name, token in beat.tokens.items()
            if token
            and (holder_fence := token.rpartition("|"))[0] == self.replica
            and (fence := holder_fence[2]).isdigit()
            and name not in self.led
            and name not in self._giving_up
        ]
        if orphans:  # given up or lost, but not released (Redis was down): give them back,
            # else a live member would hold a source that nobody polls
            await self.leases.release_all(orphans, leave=False)
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
                # and the heartbeat of this round must not wait for it. Until it is done (the
                # lease released) the source is not acquired again: two loops of one source
                # would race, the old one's events landing after the new one's.
                led = self._giving_up[name] = self.led.pop(name)
                task = asyncio.create_task(self._give_up(led))
                self._leaving.add(task)
                task.add_done_callback(self._leaving.discard)
        others = [left for member, left in beat.live.items() if member != self.replica]
        self._retry_in_s = min(others) if others else None  # a member dying this period
        want = share - len(self.led)
        if want <= 0:
            return
        free = [
            name
            for name in self._order
            if name not in self.led
            and name not in self._giving_up
            and ((holder := beat.holder(name)) is None or holder == self.replica
                 or holder not in beat.live)
        ]  # fmt: skip
        while want > 0 and free:
            batch, free = free[:want], free[want:]
            for lease in await self.leases.acquire_many(batch):
                self._lead(self.specs[lease.source], lease)
                want -= 1
            if (free_in := self.leases.free_in_s) is not None:
                soonest = self._retry_in_s
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
            slots=self.slots,
            lag=self.lag,
            offset_s=start_offset_s(spec.name, spec.watch.interval, len(self.specs)),
            rng=self.rng,
        )
        loop.telemetry.set_lease_held(True)
        task = asyncio.create_task(self._run_led(lease, loop), name=f"lead:{spec.name}")
        self.led[spec.name] = _Led(lease, loop, task)

    async def _run_led(self, lease: Lease, loop: SourceLoop) -> None:
        """Run a led source's loop until it ends or the lease is lost (which stops it at once);
        then give the lease back, unless it is lost or :meth:`run` releases it with the rest."""
        runner = asyncio.create_task(self._run_loop(lease, loop), name=f"source:{lease.source}")
        lost = asyncio.create_task(lease.lost.wait())
        try:
            await asyncio.wait([runner, lost], return_when=asyncio.FIRST_COMPLETED)
            if lease.lost.is_set():
                log.warning("stopping source %r at once: its lease is lost", lease.source)
        finally:
            # Lost: nothing to give back (another replica's now, or free for the taking).
            gone = lease.lost.is_set()
            # Also stop the loop without relying on the cancellation: on Python 3.11 a
            # cancellation can be swallowed (asyncio.wait_for, used by redis-py).
            lease.lost.set()
            loop.telemetry.set_lease_held(False)
            loop.stop()
            for task in (runner, lost):
                task.cancel()
            await asyncio.gather(runner, lost, return_exceptions=True)
            if self.held.get(lease.source) is lease:
                del self.held[lease.source]
            if not gone and lease not in self._released_together:  # else: run() does
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
        try:
            await stop_loops([(led.loop, led.task)], self.shutdown_grace_s)
        finally:
            if self._giving_up.get(led.lease.source) is led:
                del self._giving_up[led.lease.source]

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
    prefix = prefix_for(redis, prefix)
    now_s, now_us = await redis.time()
    now_ms = now_s * 1000 + now_us // 1000
    replicas = {as_text(r) for r in await redis.zrangebyscore(replicas_key(prefix), now_ms, "+inf")}
    holders: dict[str, Any] = {}
    for name in sources:
        keys = SourceKeys(name, prefix)
        token = await redis.get(keys.lease)
        revision = await redis.hget(keys.meta, "revision")
        holder, _, fence = (as_text(token) if token else "").rpartition("|")
        holders[name] = {  # a lease lives by its holder's membership
            "holder": holder if holder in replicas else None,
            "fence": int(fence) if fence else None,
            "revision": int(revision) if revision else None,
        }
    return {"replicas": sorted(replicas), "sources": holders}
