"""``RedisStateStore``: checkpoints in Redis, every write fenced by the source's lease.

``begin`` and ``commit`` run as scripts that first compare the lease key with the writer's
token (``"<replica>|<fence>"``): a replica whose lease expired — paused, partitioned, slow —
gets :class:`~bridge.errors.FencedError` and cannot overwrite what the new leader wrote.
A commit applies one batch's delta (``HSET``/``HDEL`` of the changed entries only), sets the
revision and drops the intent (or records the next batch's), atomically. The format version
is checked on load: a foreign or corrupt checkpoint is reported (StateError) and the caller
resyncs from a full poll after :meth:`RedisStateStore.reset`. On Redis Cluster or Sentinel a
write counts only once a replica has it (``WAIT``, :mod:`bridge.ha.replication`): a failover
of the primary loses no checkpoint the bridge went on from.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions

from bridge.aio import Backoff
from bridge.errors import FencedError, StateError
from bridge.ha.keys import CHECKPOINT_FORMAT, SourceKeys, as_text
from bridge.ha.leases import Lease
from bridge.ha.replication import Replication
from bridge.sources.base import StateDelta
from bridge.state import Checkpoint, Intent, intent_from_record, intent_to_record
from bridge.state.codec import dumps, loads

__all__ = ["RedisStateStore"]

log = logging.getLogger("bridge.ha")

_FENCE = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end\n"
_BEGIN = _FENCE + "redis.call('SET', KEYS[2], ARGV[2])\nreturn 1\n"
# KEYS: lease, state, meta, intent
# ARGV: token, format, revision, fence, next intent ('' for none), n_set, k1, v1, ..., deleted keys
_COMMIT = (
    _FENCE
    + """
local n_set = tonumber(ARGV[6])
local i = 7
local batch = {}
for _ = 1, n_set do
  batch[#batch + 1] = ARGV[i]
  batch[#batch + 1] = ARGV[i + 1]
  i = i + 2
  if #batch >= 1000 then redis.call('HSET', KEYS[2], unpack(batch)); batch = {} end
end
if #batch > 0 then redis.call('HSET', KEYS[2], unpack(batch)) end
local gone = {}
while i <= #ARGV do
  gone[#gone + 1] = ARGV[i]
  i = i + 1
  if #gone >= 1000 then redis.call('HDEL', KEYS[2], unpack(gone)); gone = {} end
end
if #gone > 0 then redis.call('HDEL', KEYS[2], unpack(gone)) end
redis.call('HSET', KEYS[3], 'format', ARGV[2], 'revision', ARGV[3], 'fence', ARGV[4])
if ARGV[5] == '' then redis.call('DEL', KEYS[4]) else redis.call('SET', KEYS[4], ARGV[5]) end
return 1
"""
)
_RESET = _FENCE + "redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])\nreturn 1\n"
_SCAN_COUNT = 10_000


class RedisStateStore:
    """Checkpoints of the sources whose leases this replica holds."""

    def __init__(
        self,
        redis: aioredis.Redis,
        leases: dict[str, Lease],
        replication: Replication | None = None,
    ) -> None:
        self.redis = redis
        self.replication = replication or Replication()
        """Writes count once this many replicas have them (:mod:`bridge.ha.replication`)."""
        self.leases = leases
        """The leases currently held, by source name; writes need the source's lease."""
        self._begin = redis.register_script(_BEGIN)
        self._commit = redis.register_script(_COMMIT)
        self._reset = redis.register_script(_RESET)

    def _lease(self, source_name: str) -> Lease:
        lease = self.leases.get(source_name)
        if lease is None:
            raise FencedError(f"no lease held on source {source_name!r}")
        lease.check()
        return lease

    async def load(self, source_name: str) -> Checkpoint | None:
        """The checkpoint, or None. Redis unreachable is retried while the lease holds, not
        reported: a StateError makes the caller reset the checkpoint as corrupt."""
        lease = self._lease(source_name)
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                return await self._load(source_name, lease.keys)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                lease.check()  # FencedError once the lease is lost
                log.warning(
                    "loading the checkpoint of source %r failed, retrying: %s", source_name, exc
                )
                await asyncio.sleep(backoff.next())

    async def _load(self, source_name: str, keys: SourceKeys) -> Checkpoint | None:
        try:
            meta = await self.redis.hgetall(keys.meta)
            if not meta:
                return None
            fmt = as_text(meta.get(b"format", b"?"))
            if fmt != CHECKPOINT_FORMAT:
                raise StateError(
                    f"checkpoint of source {source_name!r} in Redis has format {fmt!r}, "
                    f"this version reads {CHECKPOINT_FORMAT!r}"
                )
            checkpoint = Checkpoint(revision=int(meta[b"revision"]))
            state = checkpoint.state
            cursor = 0
            while True:
                cursor, chunk = await self.redis.hscan(keys.state, cursor, count=_SCAN_COUNT)
                for key, value in cast(dict[bytes, bytes], chunk).items():
                    state[as_text(key)] = as_text(value)
                if cursor == 0:
                    break
            raw_intent = await self.redis.get(keys.intent)
            if raw_intent is not None:
                checkpoint.intent = intent_from_record(loads(raw_intent))
            return checkpoint
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            raise
        except redis.exceptions.RedisError as exc:
            raise StateError(
                f"cannot load the checkpoint of source {source_name!r}: {exc}"
            ) from exc
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise StateError(
                f"checkpoint of source {source_name!r} in Redis is corrupt: {exc!r}"
            ) from exc

    async def begin(self, source_name: str, intent: Intent) -> None:
        lease = self._lease(source_name)
        payload = dumps(intent_to_record(intent))
        await self._run(self._begin, lease, [lease.keys.lease, lease.keys.intent], [payload])

    async def commit(
        self,
        source_name: str,
        revision: int,
        delta: StateDelta,
        next_intent: Intent | None = None,
    ) -> None:
        lease = self._lease(source_name)
        sets: list[str] = []
        gone: list[str] = []
        for key, value in delta.items():
            if value is None:
                gone.append(key)
            else:
                sets += (key, value)
        keys = lease.keys
        intent = dumps(intent_to_record(next_intent)) if next_intent is not None else b""
        args: list[Any] = [
            CHECKPOINT_FORMAT,
            revision,
            lease.fence,
            intent,
            len(sets) // 2,
            *sets,
            *gone,
        ]
        await self._run(self._commit, lease, [keys.lease, keys.state, keys.meta, keys.intent], args)

    async def reset(self, source_name: str) -> None:
        """Delete the source's checkpoint (after a corrupt one was reported)."""
        lease = self._lease(source_name)
        keys = lease.keys
        await self._run(self._reset, lease, [keys.lease, keys.state, keys.meta, keys.intent], [])

    async def _run(self, script: Any, lease: Lease, keys: list[str], args: list[Any]) -> None:
        try:
            await self.replication.run(
                self.redis,
                script,
                keys,
                [lease.token, *args],
                f"the checkpoint write of source {lease.source!r}",
            )
        except redis.exceptions.ResponseError as exc:
            if "FENCED" in str(exc):
                lease.lost.set()
                raise FencedError(
                    f"state write for source {lease.source!r} refused: fence {lease.fence} no "
                    "longer holds the lease"
                ) from exc
            raise StateError(f"state write for source {lease.source!r} failed: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise StateError(f"state write for source {lease.source!r} failed: {exc}") from exc

    async def aclose(self) -> None:
        return None
