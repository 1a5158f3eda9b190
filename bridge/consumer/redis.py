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
entry id is below the last one read, whose count of entries ever added is below what the watch
read (created again), or (with a group) that lacks the group. Then, like the NATS
watch and kube-rs' watcher after a gap, it **lists again** (initial deliveries, then a new
:class:`Synced`, so a :class:`~bridge.consumer.reflector.Reflector` drops what the new list
lacks) and goes on after that list, creating the group again at its position. Without
``list_first`` it reads such a stream from its start instead (everything in it is new), and
creates a missing group again at the last entry id read if the stream still holds it, else at
``0``. A reply lost with a broken connection leaves its entries pending in the group:
``XAUTOCLAIM`` delivers them after ``claim_idle_s``.

**Trimmed history**: before each read the watch compares how many entries were trimmed from the
stream's front (``entries-added`` - ``length``) with how many it (its group: the server's
``entries-read``, kept since groups are created with ``ENTRIESREAD``) had read. More trimmed
than read means entries it never got are gone: it logs that and lists that stream again (then
the group's entries up to the list's position are acknowledged quietly: the list covers them);
a pending entry found trimmed does the same. Without ``list_first`` the loss is logged. Still,
size ``maxlen`` for the slowest consumer.

``list_on_resume=True`` lists a stream that has the group too (a cache that starts empty wants
it), with :class:`Synced` ``listed=True``; a resumed group otherwise sends ``listed=False``.
Deliveries carry the group's delivery count (``attempt``, ``XPENDING`` for redeliveries and
claims), bounded by ``max_deliveries`` (see :func:`~bridge.consumer.run_handler`); a dead letter
goes to the stream ``koprs:deadletter:<source>`` (:mod:`bridge.consumer.dead_letters`). With a
group, consumers with nothing pending idle for ``prune_idle_s`` are deleted from it at each
claim round.

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
-- KEYS[1] stream, KEYS[2] items hash; ARGV[1] group ('' for none), ARGV[2] '1' to list when
-- the stream lacks the group or entries after the group's position were trimmed, '2' to list
-- in any case, '0' not to list
-- returns {last entry id, 1 if the stream has the group else 0, HGETALL of the items (or {}),
-- entries ever added, length, the group's last delivered id, the group's entries-read (-1:
-- unknown), the group's lag (-1: unknown), 1 if entries after the group's position were
-- trimmed else 0, the first entry id}: one atomic read, consistent with the sink's writes
local function before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
local last, has_group, added, length, first = '0-0', 0, 0, 0, '0-0'
local delivered, entries_read, lag, trimmed = '0-0', -1, -1, 0
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'stream' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    local name = info[i]
    if name == 'last-generated-id' then last = info[i + 1]
    elseif name == 'entries-added' then added = info[i + 1]
    elseif name == 'length' then length = info[i + 1]
    elseif name == 'recorded-first-entry-id' then first = info[i + 1] end
  end
  if ARGV[1] ~= '' then
    for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
      local fields = {}
      for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
      if fields['name'] == ARGV[1] then
        has_group = 1
        delivered = fields['last-delivered-id']
        if fields['entries-read'] then entries_read = fields['entries-read'] end
        if fields['lag'] then lag = fields['lag'] end
      end
    end
  end
  if has_group == 1 and length > 0 then
    if entries_read >= 0 then
      if added - length > entries_read then trimmed = 1 end
    elseif before(delivered, first) and added > length then
      trimmed = 1
    end
  end
elseif kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' holds a ' .. kind .. ', not a stream')
end
local items = {}
if ARGV[2] == '2' or (ARGV[2] == '1' and (has_group == 0 or trimmed == 1)) then
  items = redis.call('HGETALL', KEYS[2])
end
return {last, has_group, items, added, length, delivered, entries_read, lag, trimmed, first}
"""


@dataclasses.dataclass(frozen=True, slots=True)
class _StreamState:
    """What :data:`SNAPSHOT_SCRIPT` tells of one stream."""

    last: str
    has_group: bool
    items: dict[str, str]
    added: int
    """Entries ever added to the stream."""
    length: int
    group_position: str
    """The group's last delivered id."""
    entries_read: int | None
    """The group's count of entries read (None: unknown to the server)."""
    lag: int | None
    """Entries not yet delivered to the group (None: unknown)."""
    trimmed: bool
    """Entries after the group's position were trimmed before the group read them."""

    @property
    def removed(self) -> int:
        """Entries trimmed (or deleted) from the front so far."""
        return self.added - self.length


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
    list_on_resume: bool = False,
    max_deliveries: int | None = 5,
    dead_letters: bool = True,
    prune_idle_s: float | None = 3600.0,
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
        list_on_resume=list_on_resume,
        max_deliveries=max_deliveries,
        dead_letters=dead_letters,
        prune_idle_s=prune_idle_s,
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
        self._listing: deque[tuple[str, str, str]] = deque()
        """(stream, item key, entry id) still to fetch for the list."""
        self._to_create: dict[str, tuple[str, int]] = {}
        """Per stream: the id to create the group at once the list is through, and the count of
        entries up to it."""
        self._own_pending: dict[str, str] = {}
        """Per stream: where the next read of this consumer's pending entries starts."""
        self._claim_from = dict.fromkeys(self._sources, "0-0")
        self._next_claim = 0.0
        self._started = self._synced = False
        self._listed = True
        """Whether the last start listed every stream (``Synced.listed``)."""
        self._prune_idle_s = config.prune_idle_s
        self._said_no_counts = False
        self._relist: set[str] = set()
        """Streams to list again at the next start, even though they have the group."""
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
                    self._ready.append(Synced(tuple(self._sources.values()), listed=self._listed))
            else:
                await self._retrying(self._read_live)

    @property
    def durable_name(self) -> str | None:
        """The group's name (None: no group), e.g. for metrics labels."""
        return self.group

    async def _release(self) -> None:
        """Close the client the watch made (once acknowledgements in flight are through)."""
        if self._cluster_reads is not None:
            await self._cluster_reads.cancel()
        if self._owns_client:
            await self._acks_done(timeout_s=2.0)
            await self._client.aclose()

    # -- phases --

    async def _start(self) -> None:
        if self._cluster_reads is not None:  # reads from old positions
            await self._cluster_reads.cancel()
        cfg = self.config
        snapshots = await self._snapshot(list_items=cfg.list_first, force=self._relist)
        self._own_pending.clear()
        self._to_create.clear()
        self._listed_upto.clear()
        self._claim_from = dict.fromkeys(self._sources, "0-0")
        listing: list[tuple[str, str, str]] = []
        self._listed = cfg.list_first
        for stream, state in snapshots.items():
            self._cursor[stream] = state.last
            resumed = self.group is not None and state.has_group
            trimmed = resumed and state.trimmed
            if trimmed and cfg.list_first:
                log.warning(
                    "%s on %s: entries after %s were trimmed before group %r read them; "
                    "listing again",
                    stream, self._where, state.group_position, self.group,
                )  # fmt: skip
            listed = cfg.list_first and (
                not resumed or cfg.list_on_resume or trimmed or stream in self._relist
            )
            self._listed = self._listed and listed
            self._entries_read[stream] = state.added
            if resumed:
                self._own_pending[stream] = "0-0"
                if listed:  # the group's entries up to here are covered by the list
                    self._listed_upto[stream] = state.last
                    self._entries_read[stream] = state.added
                else:
                    self._entries_read.pop(stream, None)
            elif self.group is not None:
                self._to_create[stream] = (state.last, state.added)
            if listed:
                items = state.items.items()
                listing += sorted(((stream, key, entry) for key, entry in items), key=_by_id)
        self._relist.clear()
        self._pending_trimmed.clear()
        self._listing = deque(listing)
        self._started = True

    async def _snapshot(
        self, *, list_items: bool, force: set[str] | None = None
    ) -> dict[str, _StreamState]:
        """Per stream: what :data:`SNAPSHOT_SCRIPT` returns (items: those listed)."""
        pipe = self._client.pipeline(transaction=False)
        for stream in self._sources:
            keys = (stream, items_key(self._sources[stream], self.config.stream_prefix))
            always = self.config.list_on_resume or stream in (force or ())
            how = ("2" if always else "1") if list_items else "0"
            pipe.execute_command("EVAL", SNAPSHOT_SCRIPT, 2, *keys, self.group or "", how)
        replies = await keep_cancellation(pipe.execute())
        result = {}
        for stream, reply in zip(self._sources, replies, strict=True):
            last, has_group, flat, added, length, delivered, read, lag, trimmed, _first = reply
            items = {text(k): text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
            result[stream] = _StreamState(
                last=text(last),
                has_group=bool(has_group),
                items=items,
                added=int(added),
                length=int(length),
                group_position=text(delivered),
                entries_read=int(read) if int(read) >= 0 else None,
                lag=int(lag) if int(lag) >= 0 else None,
                trimmed=bool(trimmed),
            )
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
                self._ready.append(
                    self._delivery(stream, entry_id, added, fields=found[0][1], initial=True)
                )

    async def _create_groups(self) -> None:
        assert self.group is not None or not self._to_create
        for stream, (position, entries_read) in list(self._to_create.items()):
            await self._create_group(stream, position, entries_read)
            del self._to_create[stream]

    async def _create_group(self, stream: str, position: str, entries_read: int | None) -> None:
        """``XGROUP CREATE``; with ``entries_read`` (the count of entries up to ``position``)
        the server keeps the group's count of entries read, which tells trimmed entries."""
        counted = () if entries_read is None else ("ENTRIESREAD", entries_read)
        try:
            await self._command(
                "XGROUP", "CREATE", stream, self.group, position, "MKSTREAM", *counted
            )
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
            log.debug("group %r of %s exists already (created meanwhile)", self.group, stream)

    async def _read_live(self) -> None:
        loop = asyncio.get_running_loop()
        await self._release_retries(loop.time())
        if self._ready:
            return
        await self._check_history()
        if not self._started:  # to list again
            return
        if self.group is not None:
            if self._own_pending:
                await self._read_own_pending()
                return
            if loop.time() >= self._next_claim:
                self._next_claim = loop.time() + self.config.claim_idle_s
                await self._autoclaim()
                await self._prune_consumers()
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
            await self._accept(stream, entries, lag=self._lag.get(stream))

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
            await self._accept(stream, entries, counts=await self._counts(stream, entries))

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
            await self._accept(stream, reply[1], counts=await self._counts(stream, reply[1]))

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
            counts = await self._counts(retry.stream, claimed)
            await self._accept(retry.stream, claimed, counts=counts)

    async def _prune_consumers(self) -> None:
        """Delete the group's consumers with nothing pending, idle for ``prune_idle_s``."""
        idle_s = self._prune_idle_s
        if idle_s is None or self.group is None:
            return
        for stream in self._sources:
            try:
                consumers = await keep_cancellation(
                    self._client.xinfo_consumers(stream, self.group)
                )
            except redis.exceptions.NoPermissionError as exc:
                log.warning("not pruning dead consumers of group %r: %s", self.group, exc)
                self._prune_idle_s = None
                return
            for consumer in consumers:
                name = text(consumer["name"])
                if name == self.consumer or int(consumer["pending"]) > 0:
                    continue
                if int(consumer["idle"]) < idle_s * 1000:
                    continue
                await self._command("XGROUP", "DELCONSUMER", stream, self.group, name)
                log.info(
                    "deleted consumer %r of group %r of %s (nothing pending, idle %.0f s)",
                    name, self.group, stream, int(consumer["idle"]) / 1000,
                )  # fmt: skip

    async def _counts(self, stream: str, entries: list[Any]) -> dict[str, int]:
        """Per entry id: how many times the group delivered it (``XPENDING``)."""
        if self.group is None or not entries:
            return {}
        ids = sorted((text(entry[0]) for entry in entries), key=parse_id)
        try:
            rows = await keep_cancellation(
                self._client.xpending_range(
                    stream, self.group, ids[0], ids[-1], len(entries) * 2, self.consumer
                )
            )
        except redis.exceptions.NoPermissionError as exc:
            if not self._said_no_counts:
                self._said_no_counts = True
                log.warning("delivery counts unknown (redeliveries are not bounded): %s", exc)
            return {}
        return {text(row["message_id"]): int(row["times_delivered"]) for row in rows or ()}

    async def _check_history(self) -> None:
        """Before a read: look for streams (or groups) the server lost, and for entries trimmed
        (``MAXLEN``) before this watch read them. List those streams again, or without
        ``list_first`` read them from their start (a missing group is created again); trimmed
        entries without ``list_first`` are logged as lost."""
        snapshots = await self._snapshot(list_items=False)
        lost: dict[str, str] = {}
        trimmed: dict[str, str] = {}
        for stream, state in snapshots.items():
            self._lag[stream] = state.lag
            cursor = self._cursor[stream]
            if parse_id(state.last) < parse_id(cursor):
                lost[stream] = f"it ends at {state.last}, before {cursor} already read"
                continue
            if self.group is not None and not state.has_group:
                lost[stream] = f"group {self.group!r} is missing"
                continue
            read = self._entries_read.get(stream)
            if self.group is None and read is not None and state.added < read:
                lost[stream] = (
                    f"it was created again ({state.added} entries added, fewer than the {read} "
                    "this watch knew)"
                )
                continue
            if self._trimmed(stream, state):
                trimmed[stream] = (
                    f"{state.removed} entries were trimmed from its front, some before this "
                    "watch read them"
                )
                self._entries_read[stream] = state.removed  # reported once
            elif stream in self._pending_trimmed:
                trimmed[stream] = "entries delivered but not acknowledged were trimmed"
        self._pending_trimmed.clear()
        for stream, why in {**lost, **trimmed}.items():
            log.warning(
                "%s on %s: %s; %s", stream, self._where, why,
                "listing again"
                if self.config.list_first
                else "reading it from its start" if stream in lost else "they are lost",
            )  # fmt: skip
        if (lost or trimmed) and self._cluster_reads is not None:
            await self._cluster_reads.cancel()  # reads from positions no longer right
        if (lost or trimmed) and self.config.list_first:
            self._relist |= set(trimmed)
            self._started = self._synced = False
            self._retries.clear()  # stale: the list brings every item's latest event
            return
        for stream, state in snapshots.items():
            if stream not in lost:
                continue
            read = self._entries_read.get(stream)
            recreated = self.group is None and read is not None and state.added < read
            if parse_id(state.last) < parse_id(self._cursor[stream]) or recreated:
                self._cursor[stream] = "0-0"
            if self.group is not None:
                await self._create_group(stream, self._cursor[stream], None)
                self._claim_from[stream] = "0-0"
            self._entries_read[stream] = 0 if self._cursor[stream] == "0-0" else state.added

    def _trimmed(self, stream: str, state: _StreamState) -> bool:
        """Whether entries were trimmed from the stream before this watch (its group) read them:
        more were removed from the front than had been read."""
        if state.length == 0:
            return False
        known = self._entries_read.get(stream)
        if self.group is None:
            return known is not None and state.removed > known
        read = state.entries_read
        if read is None and known is None:
            return state.trimmed  # the server's estimate from ids
        return state.removed > max(read or 0, known or 0)

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
            except redis.exceptions.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                log.warning("Redis %s: %s; recreating it", self._where, exc)
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
