"""``RedisWatch``: list-then-watch over the streams :class:`~bridge.sinks.redis.RedisSink` writes.

``watch_redis(url_or_client, ["files", "web"], group="operator")`` yields, as a
:class:`~bridge.consumer.base.Watch`:

1. **The list**: for every source, one :class:`Delivery` (``initial=True``) per live item: its
   latest event, with the change turned into an ``Added`` (the CloudEvent context is kept). The
   item hash ``{koprs:external:<source>}:items`` and the stream's last entry id are read by one
   script, atomically, so the list is the state at that entry id: the sink changes both in one
   transaction. Removed items are not in the hash. The entries are then fetched by id in
   pipelined batches, in stream order. An entry trimmed by ``MAXLEN`` is missing: the item is
   left out with a warning naming it (size the sink's ``maxlen`` above the number of items).
2. **Synced**, once for all sources.
3. **Live changes**, strictly after the list's entry id: no gap, no duplicate.

Without ``group``: plain ``XREAD`` from the list's position; nothing is durable, ``ack`` does
nothing, ``nak(delay)`` yields the event again from this process after ``delay``. Every start
lists again.

With ``group`` (a consumer group, durable in Redis; ``consumer`` names this process in it and
should be stable across its restarts, e.g. the pod name; default ``<hostname>-<pid>``):

* A stream that does not have the group yet is listed, and the group is created (``XGROUP
  CREATE ... <list's entry id> MKSTREAM``) once the list has been gone through, i.e. when
  :class:`Synced` is due: a consumer that dies during the list lists again when it restarts.
  Processes that start a new group at the same moment may each list (at least once).
* A stream that already has the group is **not listed**: the group resumes from its durable
  position. First this consumer's own pending entries (``XREADGROUP`` from ``0``: delivered
  before its restart but not acknowledged), then entries idle for ``claim_idle_s`` in any
  consumer's pending list (``XAUTOCLAIM``, also every ``claim_idle_s`` after: a dead consumer's
  entries move to a live one), then new entries (``XREADGROUP >``). A cache that lives in memory
  wants the list on every start: use no group, or a group of its own per process.
* ``ack()`` is ``XACK``. ``nak(delay)`` leaves the entry pending and, after ``delay``, claims it
  back with ``XCLAIM`` (``min-idle-time`` = the delay, so an entry another consumer claimed
  meanwhile is not taken back) and yields it again. If this process dies first, the entry is
  still pending: redelivered on restart or claimed by another consumer. Initial deliveries are
  not stream deliveries of the group: acking them does nothing, a nak yields them again from
  this process only.
* Several consumers of one group split the entries; several groups each get every entry.

A nak'ed event comes back after the ones read meanwhile: order holds per stream otherwise.
One task iterates a watch; ``ack``/``nak`` may be called from anywhere on its event loop.

Outages: a Redis error that a reconnection may cure (refused connection, timeout, read-only
replica, loading) is logged and the step tried again with exponential backoff, forever. Any
other Redis error (a key of the wrong type...) is raised. After an error, and after every read
that waited ``block_s`` for nothing, the watch checks whether the server lost data (restarted
without persistence, failed over to an empty replica, a stream deleted): a stream whose last
entry id is below the last one read, or (with a group) that lacks the group. Then, like the NATS
watch and kube-rs' watcher after a gap, it **lists again** (initial deliveries, then a new
:class:`Synced`, so a :class:`~bridge.consumer.reflector.Reflector` drops what the new list
lacks) and goes on after that list, creating the group again at its position. Without
``list_first`` it reads such a stream from its start instead (everything in it is new), and
creates a missing group again at the last entry id read if the stream still holds it, else at
``0``. A reply lost with a broken connection leaves its entries pending in the group:
``XAUTOCLAIM`` delivers them after ``claim_idle_s``. Entries trimmed by ``MAXLEN`` before this
watch read them are not noticed: size ``maxlen`` for the slowest consumer.

Entries that do not decode (not a koprs CloudEvent, unknown type or version) are logged and
skipped, and acknowledged with a group; with ``on_decode_error="raise"`` the
:class:`~bridge.errors.DecodeError` is raised by the iteration instead (the entry is left
pending) and the next iteration goes on after it.

If a client is passed instead of a URL it is not closed by :meth:`RedisWatch.aclose` (so a
blocked read ends within ``block_s`` only), its ``socket_timeout`` must be longer than
``block_s`` (or None), and its own retry policy applies too. A client made from a URL retries
nothing itself: the watch does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bridge.aio import Backoff, keep_cancellation
from bridge.connection_settings import AuthConfig, TlsConfig
from bridge.connections import describe_error, redis_client
from bridge.connections_redis import is_cluster
from bridge.consumer.base import Synced
from bridge.consumer.redis_cluster_reads import ClusterReads
from bridge.consumer.redis_config import RedisWatchConfig
from bridge.consumer.redis_entries import RETRYABLE, EntryId, RedisEntries, parse_id, text
from bridge.events import Added
from bridge.secrets import redact_url
from bridge.sinks.redis_config import items_key
from bridge.subjects import REDIS_STREAM_PREFIX

__all__ = ["SNAPSHOT_SCRIPT", "RedisWatch", "RedisWatchConfig", "watch_redis"]

log = logging.getLogger(__name__)

SNAPSHOT_SCRIPT = """
-- KEYS[1] stream, KEYS[2] items hash; ARGV[1] group ('' for none), ARGV[2] '1' to list
-- returns {last entry id, 1 if the stream has the group, else 0, HGETALL of the items (or {}
-- when not listing or the group exists)}: one atomic read, consistent with the sink's writes
local last, has_group = '0-0', 0
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'stream' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
  if ARGV[1] ~= '' then
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
      for i = 1, #group, 2 do
        if group[i] == 'name' and group[i + 1] == ARGV[1] then has_group = 1 end
      end
    end
  end
elseif kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' holds a ' .. kind .. ', not a stream')
end
local items = {}
if ARGV[2] == '1' and has_group == 0 then items = redis.call('HGETALL', KEYS[2]) end
return {last, has_group, items}
"""

_LIST_BATCH = 256
"""Entries of the list fetched in one pipelined round trip."""


def watch_redis(
    url_or_client: str | redis.asyncio.Redis,
    sources: Iterable[str],
    *,
    group: str | None = None,
    consumer: str | None = None,
    list_first: bool = True,
    stream_prefix: str = REDIS_STREAM_PREFIX,
    on_decode_error: Literal["skip", "raise"] = "skip",
    batch_size: int = 100,
    block_s: float = 5.0,
    claim_idle_s: float = 60.0,
    retry_max_s: float = 5.0,
    tls: TlsConfig | None = None,
    auth: AuthConfig | None = None,
) -> RedisWatch:
    """A :class:`RedisWatch` of ``sources``; the options are those of :class:`RedisWatchConfig`."""
    config = RedisWatchConfig(
        sources=tuple(sources),
        group=group,
        consumer=consumer,
        list_first=list_first,
        stream_prefix=stream_prefix,
        on_decode_error=on_decode_error,
        batch_size=batch_size,
        block_s=block_s,
        claim_idle_s=claim_idle_s,
        retry_max_s=retry_max_s,
        tls=tls,
        auth=auth,
    )
    return RedisWatch(url_or_client, config)


class RedisWatch(RedisEntries):
    """An async iterator of :data:`WatchItem` over Redis streams; see the module docstring."""

    messaging_system = "redis"
    """For the spans of :func:`bridge.consumer.run_handler`."""

    def __init__(self, url_or_client: str | redis.asyncio.Redis, config: RedisWatchConfig) -> None:
        if isinstance(url_or_client, str):
            client = redis_client(
                url_or_client,
                config.tls,
                config.auth,
                socket_timeout=config.block_s + 10.0,
                socket_connect_timeout=10.0,
                # no retries of its own: the watch's loop retries (and notices outages), and
                # a blocking read retried after aclose() would outlive the watch
                retry=Retry(NoBackoff(), 0),
            )
            super().__init__(config, client)
            self._owns_client = True
            self._where = redact_url(url_or_client)
        else:
            super().__init__(config, url_or_client)
            self._owns_client, self._where = False, "Redis"
        self.consumer = config.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._listing: deque[tuple[str, str, str]] = deque()
        """(stream, item key, entry id) still to fetch for the list."""
        self._to_create: dict[str, str] = {}
        """Per stream: the id to create the group at once the list is through."""
        self._own_pending: dict[str, str] = {}
        """Per stream: where the next read of this consumer's pending entries starts."""
        self._claim_from = dict.fromkeys(self._sources, "0-0")
        self._next_claim = 0.0
        self._started = self._synced = False
        self._check_streams = False
        """Set after a Redis error or an idle read: look for streams (or groups) the server
        lost."""
        self._cluster_reads = (
            ClusterReads() if is_cluster(self._client) and len(self._sources) > 1 else None
        )
        """Redis Cluster with several streams: no read may span two slots."""

    async def _fill(self) -> None:
        while not self._ready:
            if self._closed:
                return
            if not self._started:
                await self._retrying(self._start)
            elif self._listing:
                await self._retrying(self._fetch_list)
            elif not self._synced:
                await self._retrying(self._create_groups)
                if not self._closed:
                    self._synced = True
                    self._ready.append(Synced(tuple(self._sources.values())))
            else:
                await self._retrying(self._read_live)

    async def _release(self) -> None:
        """Close the client the watch made."""
        if self._cluster_reads is not None:
            await self._cluster_reads.cancel()
        if self._owns_client:
            await self._client.aclose()

    # -- phases --

    async def _start(self) -> None:
        if self._cluster_reads is not None:  # reads from old positions
            await self._cluster_reads.cancel()
        snapshots = await self._snapshot(list_items=self.config.list_first)
        self._own_pending.clear()
        self._to_create.clear()
        self._claim_from = dict.fromkeys(self._sources, "0-0")
        listing: list[tuple[str, str, str]] = []
        for stream, (last, has_group, items) in snapshots.items():
            self._cursor[stream] = last
            if self.group is not None and has_group:
                self._own_pending[stream] = "0-0"
            elif self.group is not None:
                self._to_create[stream] = last
            listing += sorted(((stream, key, entry) for key, entry in items.items()), key=_by_id)
        self._listing = deque(listing)
        self._started = True

    async def _snapshot(self, *, list_items: bool) -> dict[str, tuple[str, bool, dict[str, str]]]:
        """Per stream: (last entry id, has the group, {item key: entry id} when listed)."""
        pipe = self._client.pipeline(transaction=False)
        for stream in self._sources:
            keys = (stream, items_key(self._sources[stream], self.config.stream_prefix))
            args = (self.group or "", "1" if list_items else "0")
            pipe.execute_command("EVAL", SNAPSHOT_SCRIPT, 2, *keys, *args)
        replies = await keep_cancellation(pipe.execute())
        result = {}
        for stream, (last, has_group, flat) in zip(self._sources, replies, strict=True):
            items = {text(k): text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
            result[stream] = (text(last), bool(has_group), items)
        return result

    async def _fetch_list(self) -> None:
        batch = list(itertools.islice(self._listing, _LIST_BATCH))
        pipe = self._client.pipeline(transaction=False)
        for stream, _key, entry_id in batch:
            pipe.execute_command("XRANGE", stream, entry_id, entry_id)
        replies = await keep_cancellation(pipe.execute())
        for (stream, key, entry_id), found in zip(batch, replies, strict=True):
            self._listing.popleft()
            if not found:
                log.warning(
                    "item %r of source %r is not listed: its latest event (entry %s) was "
                    "trimmed from %s (raise the sink's maxlen above the number of items)",
                    key, self._sources[stream], entry_id, stream,
                )  # fmt: skip
                continue
            envelope = self._decode(stream, entry_id, found[0][1])
            if envelope is not None:
                added = dataclasses.replace(envelope, event=Added(envelope.event.resource))
                self._ready.append(self._delivery(stream, entry_id, added, initial=True))

    async def _create_groups(self) -> None:
        assert self.group is not None or not self._to_create
        for stream, position in list(self._to_create.items()):
            await self._create_group(stream, position)
            del self._to_create[stream]

    async def _create_group(self, stream: str, position: str) -> None:
        try:
            await self._command("XGROUP", "CREATE", stream, self.group, position, "MKSTREAM")
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
            log.debug("group %r of %s exists already (created meanwhile)", self.group, stream)

    async def _read_live(self) -> None:
        loop = asyncio.get_running_loop()
        await self._release_retries(loop.time())
        if self._ready:
            return
        if self._check_streams:
            await self._recover_lost_streams()
            if not self._started:  # to list again
                return
        if self.group is not None:
            if self._own_pending:
                await self._read_own_pending()
                return
            if loop.time() >= self._next_claim:
                self._next_claim = loop.time() + self.config.claim_idle_s
                await self._autoclaim()
                if self._ready:
                    return
        wait = self.config.block_s
        if self._retries:
            wait = min(wait, self._retries[0].due - loop.time())
        if self.group is not None:
            wait = min(wait, self._next_claim - loop.time())
        block_ms = max(1, int(wait * 1000))  # BLOCK 0 would wait forever
        if self._cluster_reads is not None:  # one read per stream: each has its own slot
            got = await self._read_each(block_ms, wait)
        elif self.group is None:
            reply = await self._command(
                "XREAD", "COUNT", self.config.batch_size, "BLOCK", block_ms,
                "STREAMS", *self._cursor, *self._cursor.values(),
            )  # fmt: skip
            got = _per_stream(reply)
        else:
            reply = await self._command(
                "XREADGROUP", "GROUP", self.group, self.consumer,
                "COUNT", self.config.batch_size, "BLOCK", block_ms,
                "STREAMS", *self._cursor, *([">"] * len(self._cursor)),
            )  # fmt: skip
            got = _per_stream(reply)
        for stream, entries in got:
            await self._accept(stream, entries)
        # idle: the time to notice a stream the server lost (read from where it no longer is)
        self._check_streams = not got

    async def _read_each(self, block_ms: int, wait_s: float) -> list[tuple[str, list[Any]]]:
        """Redis Cluster: a blocking read of each stream, left running between calls."""
        assert self._cluster_reads is not None

        def read(stream: str) -> Awaitable[Any]:
            if self.group is None:
                return self._command(
                    "XREAD", "COUNT", self.config.batch_size, "BLOCK", block_ms,
                    "STREAMS", stream, self._cursor[stream],
                )  # fmt: skip
            return self._command(
                "XREADGROUP", "GROUP", self.group, self.consumer,
                "COUNT", self.config.batch_size, "BLOCK", block_ms, "STREAMS", stream, ">",
            )  # fmt: skip

        replies = await self._cluster_reads.read(list(self._cursor), read, wait_s)
        return [pair for _stream, reply in replies for pair in _per_stream(reply)]

    async def _read_own_pending(self) -> None:
        streams = list(self._own_pending)
        if self._cluster_reads is not None:

            def pending(stream: str) -> Awaitable[Any]:
                return self._command(
                    "XREADGROUP", "GROUP", self.group, self.consumer,
                    "COUNT", self.config.batch_size,
                    "STREAMS", stream, self._own_pending[stream],
                )  # fmt: skip

            replies = await self._cluster_reads.gather(streams, pending)
            got = {s: e for _stream, reply in replies for s, e in _per_stream(reply)}
        else:
            reply = await self._command(
                "XREADGROUP", "GROUP", self.group, self.consumer,
                "COUNT", self.config.batch_size,
                "STREAMS", *streams, *[self._own_pending[s] for s in streams],
            )  # fmt: skip
            got = dict(_per_stream(reply))
        for stream in streams:
            entries = got.get(stream, [])
            if not entries:
                del self._own_pending[stream]
                continue
            self._own_pending[stream] = text(entries[-1][0])
            await self._accept(stream, entries)

    async def _autoclaim(self) -> None:
        idle_ms = int(self.config.claim_idle_s * 1000)
        for stream in self._sources:
            reply = await self._command(
                "XAUTOCLAIM", stream, self.group, self.consumer, idle_ms,
                self._claim_from[stream], "COUNT", self.config.batch_size,
            )  # fmt: skip
            self._claim_from[stream] = text(reply[0])
            if len(reply) > 2 and reply[2]:
                log.warning(
                    "%d pending entries of %s were trimmed before being acknowledged: %s",
                    len(reply[2]), stream, ", ".join(text(i) for i in reply[2]),
                )  # fmt: skip
            if reply[1]:
                log.info("claimed %d idle pending entries of %s", len(reply[1]), stream)
            await self._accept(stream, reply[1])

    async def _release_retries(self, now: float) -> None:
        """Deliver again what was nak'ed and is due (an ``XCLAIM`` first, with a group)."""
        while self._retries and self._retries[0].due <= now:
            retry = self._retries[0]
            if retry.claim_idle_ms is None:
                heapq.heappop(self._retries)
                self._ready.append(retry.delivery)
                continue
            claimed = await self._command(
                "XCLAIM", retry.stream, self.group, self.consumer, retry.claim_idle_ms,
                retry.entry_id,
            )  # fmt: skip
            heapq.heappop(self._retries)
            if not claimed:
                log.debug("%s of %s: acknowledged or claimed by another consumer since its nak",
                          retry.entry_id, retry.stream)  # fmt: skip
            await self._accept(retry.stream, claimed)

    async def _recover_lost_streams(self) -> None:
        """Look for streams (or groups) the server lost: list again, or without ``list_first``
        read them from their start (a missing group is created again)."""
        snapshots = await self._snapshot(list_items=False)
        self._check_streams = False
        lost = {
            stream: last
            for stream, (last, has_group, _items) in snapshots.items()
            if parse_id(last) < parse_id(self._cursor[stream])
            or (self.group is not None and not has_group)
        }
        for stream, last in lost.items():
            log.warning(
                "%s on %s: %s; %s", stream, self._where,
                f"group {self.group!r} is missing"
                if parse_id(last) >= parse_id(self._cursor[stream])
                else f"it ends at {last}, before {self._cursor[stream]} already read",
                "listing again" if self.config.list_first else "reading it from its start",
            )  # fmt: skip
        if lost and self._cluster_reads is not None:
            await self._cluster_reads.cancel()
        if lost and self.config.list_first:
            self._started = self._synced = False
            self._retries.clear()  # stale: the list brings every item's latest event
            return
        for stream, last in lost.items():
            if parse_id(last) < parse_id(self._cursor[stream]):
                self._cursor[stream] = "0-0"
            if self.group is not None:
                await self._create_group(stream, self._cursor[stream])
                self._claim_from[stream] = "0-0"

    # -- errors --

    async def _retrying(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` until it succeeds or the watch is closed; back off after errors."""
        backoff = Backoff(0.05, max(self.config.retry_max_s, 0.05))
        delay = backoff.next()
        while not self._closed:
            try:
                await step()
                return
            except RETRYABLE as exc:
                if self._closed:
                    return
                log.warning(
                    "Redis %s: %s; trying again in %.2f s", self._where, describe_error(exc), delay
                )
                self._check_streams = True
            except redis.exceptions.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                log.warning("Redis %s: %s; recreating it", self._where, exc)
                self._check_streams = True
            await asyncio.sleep(delay)
            delay = backoff.next()


def _per_stream(reply: Any) -> list[tuple[str, list[Any]]]:
    """``XREAD``/``XREADGROUP`` replies, RESP2 (a list of pairs) or RESP3 (a map)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(text(stream), list(entries or [])) for stream, entries in pairs]


def _by_id(listed: tuple[str, str, str]) -> EntryId:
    return parse_id(listed[2])
