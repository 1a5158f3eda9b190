"""Per-source leases in Redis, with a fencing token per acquisition, kept alive by one
membership lease per replica.

A lease is the key ``{S}:lease`` holding ``"<replica>|<fence>"``. It is *held* while either the
key lives by its own TTL (a lease taken alone with :meth:`LeaseClient.acquire`, renewed with
:meth:`LeaseClient.renew`), or its holder's membership lives: the holder's entry in the sorted
set ``koprs:bridge:replicas`` (replica id -> expiry, by the Redis server's clock). Leases taken
with :meth:`LeaseClient.acquire_many` (what :class:`~bridge.ha.sharing.Coordinator` does) have
no TTL of their own: one :meth:`LeaseClient.heartbeat` per period renews the membership and
so all of the replica's leases at once, in one round trip whatever their number (the cost of
leader election is O(replicas), not O(sources)). The same script reads back every lease key
(``MGET``), so a lease taken from under us is noticed within one period.

* acquire: if the lease is not held, ``INCR`` the fence counter and ``SET`` the key. A key of
  this replica's own that it does not lead (a restart under the same id, a lease it gave up
  locally) is taken again with a new fence. Losing the race is a normal outcome; the caller
  learns when the holder's lease could end (:attr:`LeaseClient.free_in_s`).
* renew (a lease taken alone): compare-and-extend, ``PEXPIRE`` only if the key holds our token.
* release: compare-and-delete under ``asyncio.shield``; :meth:`LeaseClient.release_all` gives
  back every lease (and the membership) in one script.
* replicated: on Redis Cluster or Sentinel, an acquisition, heartbeat or renewal counts only
  once ``WAIT`` says a replica has it (:mod:`bridge.ha.replication`), so a failover of the
  primary cannot hand a lease that was relied on to a second replica.

A lease also keeps a local deadline (the monotonic time of the last acquisition, renewal or
heartbeat plus the TTL, less a safety margin). Work for the source may only go on while
:meth:`Lease.valid` is true: a replica that was paused or cut off from Redis past its TTL
notices on its own clock before it would publish, and the fenced state commit (a compare of
the key with the token) refuses it in any case once another replica took the source over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions

from bridge import aio
from bridge.errors import FencedError, StateError
from bridge.ha.keys import SourceKeys, as_text, prefix_for, replicas_key
from bridge.ha.replication import NotReplicated, Replication

__all__ = ["Heartbeat", "Lease", "LeaseClient", "Membership"]

log = logging.getLogger("bridge.ha")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: replicas, then lease and fence of each source. ARGV: replica, ttl ms, '1' for a lease
# with its own TTL ('0': it lives by the membership). One reply per source: the fence (>= 1),
# or -1 - the milliseconds the holder's lease may still last.
_ACQUIRE = (
    _NOW
    + """
local me, ttl, alone = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local out = {}
for i = 2, #KEYS, 2 do
  local left = -1
  local token = redis.call('GET', KEYS[i])
  if token then
    local holder = string.match(token, '^(.*)|[^|]*$') or ''
    if alone or holder ~= me then
      left = redis.call('PTTL', KEYS[i])
      local expiry = redis.call('ZSCORE', KEYS[1], holder)
      if expiry then left = math.max(left, tonumber(expiry) - now) end
    end
  end
  if left > 0 then
    out[#out + 1] = -1 - left
  else
    local fence = redis.call('INCR', KEYS[i + 1])
    if alone then
      redis.call('SET', KEYS[i], me .. '|' .. fence, 'PX', ttl)
    else
      redis.call('SET', KEYS[i], me .. '|' .. fence)
    end
    out[#out + 1] = fence
  end
end
return out
"""
)
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: replicas, then the lease keys. ARGV: replica, '1' to leave the membership, then tokens.
_RELEASE = """
local deleted = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    deleted = deleted + redis.call('DEL', KEYS[i])
  end
end
if ARGV[2] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
return deleted
"""
# KEYS: replicas, then the lease keys to read back. ARGV: replica, ttl ms.
# Reply: {now ms, {member, expiry, ...}, {token or nil per lease key}}.
_HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local tokens = {}
for i = 2, #KEYS, 1000 do
  local got = redis.call('MGET', unpack(KEYS, i, math.min(i + 999, #KEYS)))
  for j = 1, #got do tokens[#tokens + 1] = got[j] end
end
return {now, live, tokens}
"""
)
_ACQUIRE_BATCH = 500
"""Sources per acquisition script: Redis runs nothing else meanwhile."""


@dataclass(eq=False)
class Membership:
    """This replica's membership lease: alive until :attr:`deadline` by the local clock."""

    deadline: float = 0.0


@dataclass(frozen=True)
class Heartbeat:
    """What one :meth:`LeaseClient.heartbeat` saw."""

    live: dict[str, float]
    """Live replicas (this one included) -> seconds until their membership expires."""
    tokens: dict[str, str | None]
    """Source -> the token its lease key holds (None: no lease)."""

    def holder(self, source: str) -> str | None:
        token = self.tokens.get(source)
        return token.rpartition("|")[0] if token else None


@dataclass(eq=False)
class Lease:
    """A held lease on one source."""

    keys: SourceKeys
    replica: str
    fence: int
    ttl_s: float
    deadline: float = field(default=0.0)
    """Local monotonic time after which the lease must be considered lost (a lease taken
    alone; one taken through a membership lives by :attr:`membership`'s deadline)."""
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    membership: Membership | None = None

    @property
    def source(self) -> str:
        return self.keys.source

    @property
    def token(self) -> str:
        return f"{self.replica}|{self.fence}"

    def valid(self) -> bool:
        deadline = self.deadline if self.membership is None else self.membership.deadline
        return not self.lost.is_set() and time.monotonic() < deadline

    def check(self) -> None:
        """Raise FencedError unless the lease is still valid by the local clock."""
        if not self.valid():
            self.lost.set()
            raise FencedError(f"lease on source {self.source!r} (fence {self.fence}) is lost")


class LeaseClient:
    """Acquires, renews and releases leases for one replica."""

    def __init__(
        self,
        redis: aioredis.Redis,
        replica: str,
        *,
        ttl_s: float,
        prefix: str,
        margin_s: float | None = None,
        replication: Replication | None = None,
    ) -> None:
        self.redis = redis
        self.replication = replication or Replication()
        """Acquisitions and renewals count once this many replicas have them
        (:mod:`bridge.ha.replication`); releases do not wait."""
        self.replica = replica
        self.ttl_s = ttl_s
        self.prefix = prefix = prefix_for(redis, prefix)  # Redis Cluster: one slot for all
        self.margin_s = min(1.0, ttl_s / 10) if margin_s is None else margin_s
        self.lost = 0
        """Leases lost so far (not given back: taken, expired, membership lapsed)."""
        self.membership = Membership()
        """The deadline of this replica's membership (see :meth:`heartbeat`)."""
        self.free_in_s: float | None = None
        """After an acquisition that found a lease held: how long until it may end, unless its
        holder renews it (None when none was held)."""
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._replicas = replicas_key(prefix)

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    async def acquire(self, source: str) -> Lease | None:
        """The lease on ``source`` if it was free, with a TTL of its own (keep it with
        :meth:`keep`); None if another replica holds it."""
        leases = await self._acquire_batch([source], alone=True)
        return leases[0]

    async def acquire_many(self, sources: Sequence[str]) -> list[Lease]:
        """The leases among ``sources`` that were free, living by this replica's membership
        (renew them all with :meth:`heartbeat`). A few round trips, whatever the number."""
        got: list[Lease] = []
        soonest: float | None = None
        for start in range(0, len(sources), _ACQUIRE_BATCH):
            batch = sources[start : start + _ACQUIRE_BATCH]
            got += [lease for lease in await self._acquire_batch(batch, alone=False) if lease]
            if self.free_in_s is not None:
                soonest = self.free_in_s if soonest is None else min(soonest, self.free_in_s)
        self.free_in_s = soonest
        return got

    async def _acquire_batch(self, sources: Sequence[str], *, alone: bool) -> list[Lease | None]:
        all_keys = [SourceKeys(source, self.prefix) for source in sources]
        started = time.monotonic()
        what = repr(sources[0]) if len(sources) == 1 else f"{len(sources)} sources"
        try:
            replies = await self.replication.run(
                self.redis,
                self._acquire,
                [self._replicas, *(k for keys in all_keys for k in (keys.lease, keys.fence))],
                [self.replica, self._ttl_ms(), "1" if alone else "0"],
                f"the acquisition of leases among {what} by replica {self.replica!r}",
            )
        except redis.exceptions.RedisError as exc:
            raise StateError(f"cannot acquire the lease on {what}: {exc}") from exc
        self.free_in_s = None
        leases: list[Lease | None] = []
        for keys, reply in zip(all_keys, replies, strict=True):
            fence = int(reply)
            if fence < 0:
                left_s = (-1 - fence) / 1000
                self.free_in_s = left_s if self.free_in_s is None else min(self.free_in_s, left_s)
                log.debug(
                    "lease on source %r is held by another replica (%.3f s left)",
                    keys.source,
                    left_s,
                )
                leases.append(None)
                continue
            lease = Lease(keys, self.replica, fence, self.ttl_s)
            if alone:
                lease.deadline = started + self.ttl_s - self.margin_s
            else:
                lease.membership = self.membership
            log.info("acquired the lease on source %r (fence %d)", keys.source, fence)
            leases.append(lease)
        return leases

    async def heartbeat(self, sources: Sequence[str]) -> Heartbeat:
        """Renew this replica's membership (so every lease taken through it) and read back
        the lease keys of ``sources``: one script, one round trip."""
        started = time.monotonic()
        keys = [SourceKeys(source, self.prefix).lease for source in sources]
        try:
            now_ms, live, tokens = await self.replication.run(
                self.redis,
                self._heartbeat,
                [self._replicas, *keys],
                [self.replica, self._ttl_ms()],
                f"the membership renewal of replica {self.replica!r}",
            )
        except redis.exceptions.RedisError as exc:
            raise StateError(
                f"cannot renew the membership of replica {self.replica!r}: {exc}"
            ) from exc
        self.membership.deadline = started + self.ttl_s - self.margin_s
        members = {
            as_text(live[i]): (float(live[i + 1]) - int(now_ms)) / 1000
            for i in range(0, len(live), 2)
        }
        return Heartbeat(
            members,
            {
                source: as_text(token) if token is not None else None
                for source, token in zip(sources, tokens, strict=True)
            },
        )

    async def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` (taken alone); False (and ``lease.lost`` set) if it is not ours."""
        started = time.monotonic()
        try:
            renewed = await self.replication.run(
                self.redis,
                self._renew,
                [lease.keys.lease],
                [lease.token, self._ttl_ms()],
                f"the renewal of the lease on source {lease.source!r}",
            )
        except (redis.exceptions.RedisError, NotReplicated) as exc:
            if time.monotonic() >= lease.deadline:
                self.lose(lease, f"Redis unreachable past the lease TTL ({exc})")
                return False
            log.warning("renewing the lease on source %r failed, retrying: %s", lease.source, exc)
            return True
        if not renewed:
            self.lose(lease, "another replica holds it now")
            return False
        lease.deadline = started + self.ttl_s - self.margin_s
        return True

    async def release(self, lease: Lease) -> None:
        """Give ``lease`` back (compare-and-delete), even when the caller is being cancelled."""
        lease.lost.set()
        try:
            deleted = await asyncio.shield(self._release_script([lease], leave=False))
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning(
                "releasing the lease on source %r failed (released again at the next round of "
                "the replica's coordinator; a lease taken alone expires by itself): %s",
                lease.source,
                exc,
            )
        else:
            if deleted:
                log.info("released the lease on source %r (fence %d)", lease.source, lease.fence)
            else:
                log.info(
                    "releasing the lease on source %r (fence %d): nothing to do, it had expired "
                    "or been taken",
                    lease.source,
                    lease.fence,
                )

    async def release_all(self, leases: Sequence[Lease], *, leave: bool = True) -> None:
        """Give back every lease of ``leases`` and, with ``leave``, the membership: one script
        (one round trip), even when the caller is being cancelled."""
        for lease in leases:
            lease.lost.set()
        try:
            deleted = await asyncio.shield(self._release_script(leases, leave=leave))
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning(
                "releasing %d lease(s) failed (other replicas take them over once the "
                "membership of %s expires): %s",
                len(leases),
                self.replica,
                exc,
            )
        else:
            log.info(
                "released %d of %d lease(s)%s",
                deleted,
                len(leases),
                " and left the replicas" if leave else "",
            )

    async def _release_script(self, leases: Sequence[Lease], *, leave: bool) -> int:
        return int(
            await self._release(
                keys=[self._replicas, *(lease.keys.lease for lease in leases)],
                args=[self.replica, "1" if leave else "0", *(lease.token for lease in leases)],
            )
        )

    async def keep(self, lease: Lease, renew_every_s: float) -> None:
        """Renew ``lease`` (taken alone) every ``renew_every_s`` until it is lost or this task
        is cancelled."""
        while not lease.lost.is_set():
            delay = max(0.0, min(renew_every_s, lease.deadline - time.monotonic()))
            if await aio.sleep(delay, lease.lost) or not await self.renew(lease):
                return

    def lose(self, lease: Lease, why: str) -> None:
        if not lease.lost.is_set():
            self.lost += 1
            log.warning(
                "lost the lease on source %r (fence %d): %s", lease.source, lease.fence, why
            )
            lease.lost.set()
