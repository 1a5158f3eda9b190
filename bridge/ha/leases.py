"""Per-source leases in Redis, with a fencing token per acquisition.

* acquire: one script — if the lease key is free, ``INCR`` the fence counter and ``SET`` the
  lease to ``"<replica>|<fence>"`` with ``PX ttl``. Losing the race is a normal outcome (None);
  the client then knows when the holder's lease expires (:attr:`LeaseClient.free_in_s`).
* renew: compare-and-extend — ``PEXPIRE`` only if the key still holds our token.
* release: compare-and-delete, under ``asyncio.shield`` so cancellation still gives it back.

A lease also keeps a local deadline (the monotonic time of the last acquisition or renewal
plus the TTL, less a safety margin). Work for the source may only go on while
:meth:`Lease.valid` is true: a replica that was paused or cut off from Redis past its TTL
notices on its own clock before it would publish, and the fenced state commit refuses it in
any case.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions

from bridge import aio
from bridge.errors import FencedError, StateError
from bridge.ha.keys import SourceKeys

__all__ = ["Lease", "LeaseClient"]

log = logging.getLogger("bridge.ha")

# Returns the fence (>= 1), or -1 - the holder's remaining milliseconds.
_ACQUIRE = """
local left = redis.call('PTTL', KEYS[1])
if left ~= -2 then
  if left < 0 then left = tonumber(ARGV[2]) end
  return -1 - left
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. fence, 'PX', ARGV[2])
return fence
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(eq=False)
class Lease:
    """A held lease on one source."""

    keys: SourceKeys
    replica: str
    fence: int
    ttl_s: float
    deadline: float = field(default=0.0)
    """Local monotonic time after which the lease must be considered lost."""
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def source(self) -> str:
        return self.keys.source

    @property
    def token(self) -> str:
        return f"{self.replica}|{self.fence}"

    def valid(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.deadline

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
    ) -> None:
        self.redis = redis
        self.replica = replica
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.margin_s = min(1.0, ttl_s / 10) if margin_s is None else margin_s
        self._acquire = redis.register_script(_ACQUIRE)
        self.free_in_s: float | None = None
        """After an :meth:`acquire` that found the lease held: how long until it expires,
        unless its holder renews it (None after a successful one)."""
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    async def acquire(self, source: str) -> Lease | None:
        """The lease on ``source`` if it was free; None if another replica holds it."""
        keys = SourceKeys(source, self.prefix)
        started = time.monotonic()
        try:
            fence = await self._acquire(
                keys=[keys.lease, keys.fence], args=[self.replica, self._ttl_ms()]
            )
        except redis.exceptions.RedisError as exc:
            raise StateError(f"cannot acquire the lease on source {source!r}: {exc}") from exc
        fence = int(fence)
        if fence < 0:
            self.free_in_s = (-1 - fence) / 1000
            log.debug(
                "lease on source %r is held by another replica (%.3f s left)",
                source,
                self.free_in_s,
            )
            return None
        self.free_in_s = None
        lease = Lease(keys, self.replica, int(fence), self.ttl_s)
        lease.deadline = started + self.ttl_s - self.margin_s
        log.info("acquired the lease on source %r (fence %d)", source, lease.fence)
        return lease

    async def renew(self, lease: Lease) -> bool:
        """Extend ``lease``; False (and ``lease.lost`` set) if it is no longer ours."""
        started = time.monotonic()
        try:
            renewed = await self._renew(keys=[lease.keys.lease], args=[lease.token, self._ttl_ms()])
        except redis.exceptions.RedisError as exc:
            if time.monotonic() >= lease.deadline:
                self._lose(lease, f"Redis unreachable past the lease TTL ({exc})")
                return False
            log.warning("renewing the lease on source %r failed, retrying: %s", lease.source, exc)
            return True
        if not renewed:
            self._lose(lease, "another replica holds it now")
            return False
        lease.deadline = started + self.ttl_s - self.margin_s
        return True

    async def release(self, lease: Lease) -> None:
        """Give ``lease`` back (compare-and-delete), even when the caller is being cancelled."""
        lease.lost.set()
        try:
            deleted = await asyncio.shield(
                self._release(keys=[lease.keys.lease], args=[lease.token])
            )
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning(
                "releasing the lease on source %r failed (it expires by itself): %s",
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

    async def keep(self, lease: Lease, renew_every_s: float) -> None:
        """Renew ``lease`` every ``renew_every_s`` until it is lost or this task is cancelled."""
        while not lease.lost.is_set():
            delay = max(0.0, min(renew_every_s, lease.deadline - time.monotonic()))
            if await aio.sleep(delay, lease.lost) or not await self.renew(lease):
                return

    @staticmethod
    def _lose(lease: Lease, why: str) -> None:
        if not lease.lost.is_set():
            log.warning(
                "lost the lease on source %r (fence %d): %s", lease.source, lease.fence, why
            )
            lease.lost.set()
