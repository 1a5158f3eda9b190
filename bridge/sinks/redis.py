"""``RedisSink``: publish CloudEvents to Redis Streams, one stream per source.

Keys, for a source ``S`` and the default ``stream_prefix`` ``koprs:external:``:

* ``koprs:external:S``: the stream, trimmed with ``XADD MAXLEN ~ maxlen`` (approximate, cheap).
* ``{koprs:external:S}:ids:<event-id>``: dedup marker of one event id, holding the id of its
  stream entry, expiring after ``dedup_window_s``. An event whose marker exists is not added
  again.
* ``{koprs:external:S}:items``: hash of the current items, field = the item key (the CloudEvent
  ``subject``), value = the stream entry id of its latest event; a ``Removed`` event deletes the
  field. Consumers list current state from it, then read the stream after the largest id they
  saw. ``MAXLEN`` trimming can drop the entry of an item that has not changed for long, so size
  ``maxlen`` above the number of items if consumers need every entry.

The markers and the items hash carry the whole stream key as hash tag (``{...}``), so all three
keys are in one Redis Cluster slot, the one of the stream key itself (which has no braces: the
stream prefix may not contain any). :func:`bridge.subjects.redis_stream_key`,
:func:`items_key` and :func:`marker_key` build the names.

Entry fields:

* ``binary`` content mode (default): the context attributes as fields named like the binary
  headers, ``ce-specversion``, ``ce-id``, ``ce-source``, ``ce-type``, ``ce-subject``,
  ``ce-time``, ``ce-dataschema`` (and ``ce-traceparent`` when tracing), percent-encoded like the
  headers (:func:`bridge.cloudevents.header_value` decodes them), ``content-type`` (the
  ``datacontenttype``, ``application/json``), and ``data``: the data as JSON bytes.
* ``structured`` content mode: one field ``event``, the whole event as JSON (CloudEvents JSON
  format).

In both modes, after those: ``koprs-kind``, ``koprs-version`` and ``koprs-revision``
(:func:`bridge.cloudevents.state_headers`), which :mod:`bridge.sinks.redis_recovery` reads to
rebuild a source's state.

A batch is published in parts of at most :data:`EVENTS_PER_TRANSACTION` events and about
:data:`BYTES_PER_TRANSACTION` bytes (a usual batch is one part). A part costs two round trips on
one connection, whatever its size:

1. ``WATCH`` the stream and the items hash; ``EXISTS`` over the markers of the part's event ids,
   a count: 0 (the usual case) means all are new, all of them means the part was published
   before; anything between costs a third round trip, an ``MGET`` of the markers, to tell which;
   and :data:`READ_SCRIPT`, which checks the key types and returns the stream's last entry id
   and the server time (a short reply, where ``XINFO STREAM`` would carry two whole entries).
2. One ``MULTI``/``EXEC`` transaction with, for the new events only (in order, each id once):
   ``XADD MAXLEN ~`` with an explicit entry id (the server time in milliseconds, or the last
   id's if that is later, and increasing sequence numbers: what ``XADD *`` would have chosen),
   then :data:`MARKER_SCRIPT`, which sets their markers (it gets keys and entry ids only: no
   payload goes through Lua, whose argument conversion made a script that did everything slow),
   and one ``HSET`` and/or ``HDEL`` of the items hash with each item's final state in the part.

Commands are packed here rather than by redis-py, and while the server runs one part's
transaction the next part is encoded.

Why nothing is lost or doubled: a transaction runs whole or not at all (one whose ``EXEC`` the
server never got runs nothing; AOF, RDB and replication never keep half of one), so an entry
never lacks its marker nor the other way round, and a failed publish retried re-reads the
markers and adds exactly what is missing (parts that were committed are skipped). Commands of a
transaction can still fail one by one at run time; the ones that could here are ruled out
beforehand, under ``WATCH``: the key types are checked, and the entry ids are above the
stream's last id. If another client changes the stream or the items hash between the two round
trips (only a second publisher of the same source, i.e. a split brain, does), ``EXEC`` does
nothing and the part is tried again from step 1, so even concurrent publishers of the same
event id add it once. A lost reply (``EXEC`` ran, the connection broke) is the same: the next
try finds the markers. What Redis itself can lose (acknowledged writes on a failover to a
lagging replica) is lost here too.

An event larger than ``max_event_bytes`` (64 MiB by default; keep it at most the server's
``proto-max-bulk-len``, 512 MiB by default, which the sink does not read: ``CONFIG GET`` is
no command for a least-privileged user) is found by :meth:`RedisSink.oversized` before
publishing, and the delivery loop leaves it out of the batch
(:class:`~bridge.sinks.SizeLimitedSink`), rather than one oversized command failing them all.

A Redis error (refused connection, timeout, an unexpected reply) is a :class:`PublishError`
naming the server, its password hidden.

Options and key names: :mod:`bridge.sinks.redis_config`; the packing:
:mod:`bridge.sinks.redis_packing`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bridge.cloudevents import CloudEvent
from bridge.connections import describe_error, redis_client
from bridge.connections_redis import key_connection, topology_errors
from bridge.errors import PublishError
from bridge.secrets import redact_url
from bridge.sinks import frame_bound
from bridge.sinks.redis_config import ContentMode, RedisSinkConfig, items_key, marker_key
from bridge.sinks.redis_packing import (
    Packed,
    Parts,
    binary_fields,
    bulk,
    command,
    structured_fields,
)
from bridge.state.recovery import Published
from bridge.subjects import redis_stream_key, validate_source_name

__all__ = [
    "BYTES_PER_TRANSACTION",
    "EVENTS_PER_TRANSACTION",
    "MARKER_SCRIPT",
    "READ_SCRIPT",
    "ContentMode",
    "NotReplicated",
    "RedisSink",
    "RedisSinkConfig",
    "items_key",
    "marker_key",
]

log = logging.getLogger(__name__)

EVENTS_PER_TRANSACTION = 1000
"""Most events in one transaction (one part of a batch): bounds how long one ``EXEC`` holds
the server. The bridge's batches are no larger by default."""
BYTES_PER_TRANSACTION = 1 << 20
"""A part is also closed once its entries reach this size (1 MiB): a transaction waits in the
server's memory until ``EXEC`` (one over ``client-query-buffer-limit`` would be refused), very
large ones are slower, and several parts let the next be encoded while the server works."""
_REMOVED_TYPE_SUFFIX = ".removed.v1"
_ATTEMPTS = 3
"""Tries of one transaction: again after a dead pooled connection, a concurrent change, or a
topology change (a slot moved, a primary that is a replica now)."""
_RETRY_AT_ONCE = (redis.exceptions.WatchError, redis.exceptions.ConnectionError)
_TOPOLOGY = topology_errors()
_TOPOLOGY_PAUSE_S = 0.1

READ_SCRIPT = """
-- KEYS[1] stream, KEYS[2] items hash
-- returns {last entry id of the stream, server time (ms)}: a short reply, where XINFO STREAM's
-- would carry the first and last entries in full
local kind = redis.call('TYPE', KEYS[1]).ok
local last = '0-0'
if kind == 'stream' then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
      break
    end
  end
elseif kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' holds a ' .. kind .. ', not a stream')
end
kind = redis.call('TYPE', KEYS[2]).ok
if kind ~= 'hash' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' holds a ' .. kind .. ', not a hash')
end
local now = redis.call('TIME')
return {last, now[1] * 1000 + math.floor(now[2] / 1000)}
"""

MARKER_SCRIPT = """
-- KEYS: the dedup markers to set; ARGV[1]: their lifetime (s), ARGV[1 + i]: value of KEYS[i]
local window = ARGV[1]
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', window)
end
return #KEYS
"""


class NotReplicated(redis.exceptions.ResponseError):
    """A write reached fewer replicas than ``replicas`` asks for within the ``WAIT`` timeout."""


class RedisSink:
    """Publishes to Redis Streams; see the module docstring. ``publish()`` connects if needed."""

    def __init__(self, config: RedisSinkConfig | None = None) -> None:
        self.config = config or RedisSinkConfig()
        self._client: redis.asyncio.Redis | None = None
        self._fields: Callable[[CloudEvent, list[bytes]], tuple[int, int]] = (
            binary_fields if self.config.content_mode == "binary" else structured_fields
        )
        self._maxlen = bulk(str(self.config.maxlen).encode())
        self._window = str(math.ceil(self.config.dedup_window_s)).encode()
        self._wait_replicas = self.config.copies - 1
        self._wait_ms = max(1, int(self.config.timeout_s * 500))  # half the publish's bound
        self._wait: list[bytes] = (
            [command(b"WAIT", b"%d" % self._wait_replicas, b"%d" % self._wait_ms)]
            if self._wait_replicas > 0
            else []
        )

    @property
    def description(self) -> str:
        return f"{redact_url(self.config.url)} streams {self.config.stream_prefix}*"

    def __repr__(self) -> str:
        return f"<RedisSink {self.description}>"

    async def connect(self) -> None:
        if self._client is None:
            cfg = self.config
            self._client = redis_client(
                cfg.url,
                cfg.tls,
                cfg.auth,
                socket_timeout=cfg.timeout_s,
                socket_connect_timeout=cfg.connect_timeout_s,
                # one immediate retry: a pooled connection may be dead after a server restart
                retry=Retry(NoBackoff(), 1),
            )
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await self._client.ping()
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise PublishError(
                f"Redis {self.description}: cannot connect: {_describe(exc)}"
            ) from exc

    async def oversized(self, source_name: str, events: Sequence[CloudEvent]) -> dict[int, str]:
        """Events whose fields together are over the limit; see the module docstring."""
        limit = self.config.max_event_bytes
        found: dict[int, str] = {}
        for index, event in enumerate(events):
            if frame_bound(event) <= limit:
                continue
            _count, size = self._fields(event, [])
            if size > limit:
                found[index] = f"an entry of {size} bytes, over max_event_bytes ({limit} bytes)"
        return found

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        validate_source_name(source_name)
        if self._client is None:
            await self.connect()
        stream = redis_stream_key(source_name, self.config.stream_prefix).encode()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                parts = Parts(self._pack, events)
                while part := parts.next():
                    await self._publish_part(stream, part, parts.prepare)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise PublishError(
                f"Redis {self.description}: {len(events)} events of {source_name!r} not "
                f"acknowledged: {_describe(exc)}"
            ) from exc

    def _pack(self, events: Sequence[CloudEvent], start: int) -> list[Packed]:
        """The fields of the events from ``start`` on, packed, as many as one part takes."""
        part: list[Packed] = []
        size = 0
        fields = self._fields
        for event in events[start : start + EVENTS_PER_TRANSACTION]:
            chunks: list[bytes] = []
            count, length = fields(event, chunks)
            part.append((event, chunks, count))
            size += length
            if size >= BYTES_PER_TRANSACTION:
                break
        return part

    async def _publish_part(
        self, stream: bytes, events: Sequence[Packed], meanwhile: Callable[[], None]
    ) -> None:
        """One transaction, tried again (from the start: it is idempotent) after a dead pooled
        connection or a concurrent change of the watched keys. ``meanwhile`` is called while
        the server runs it (to pack the next part)."""
        assert self._client is not None
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with key_connection(self._client, stream) as conn:
                    await self._transaction(conn, stream, events, meanwhile)
                return
            except BaseException as exc:
                # key_connection dropped the connection (its state - WATCH, replies not read -
                # is unknown) and, on a Cluster, re-reads the slot table after a failover
                retry = isinstance(exc, _RETRY_AT_ONCE)
                moved = isinstance(exc, _TOPOLOGY)
                if not (retry or moved) or attempt == _ATTEMPTS:
                    raise
                log.debug("Redis %s: trying a transaction again: %s", self.description, exc)
                if moved:  # a failover in progress: give the cluster a moment
                    await asyncio.sleep(_TOPOLOGY_PAUSE_S * attempt)

    async def _transaction(
        self,
        conn: AbstractConnection,
        stream: bytes,
        events: Sequence[Packed],
        meanwhile: Callable[[], None],
    ) -> None:
        hashtag = b"{" + stream + b"}"
        items = hashtag + b":items"
        marker_prefix = hashtag + b":ids:"

        # round trip 1: watch, then read the markers and what the transaction needs
        candidates: dict[str, Packed] = {}
        for packed in events:
            candidates.setdefault(packed[0].id, packed)  # an id twice in one part: added once
        markers = [marker_prefix + event_id.encode() for event_id in candidates]
        await conn.send_packed_command(
            [
                command(b"WATCH", stream, items),
                command(b"EXISTS", *markers),
                command(b"EVAL", _READ_SCRIPT, b"2", stream, items),
            ]
        )
        answers = [await _reply(conn) for _ in range(3)]
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        _watched, existing, read = answers
        last, now_ms = _read_result(read)
        if existing == 0:  # the usual case: every event is new
            new = list(zip(candidates.values(), markers, strict=True))
        elif existing == len(markers):  # a batch published again whole
            new = []
        else:  # partly published before: which ones (one more round trip, still watched)
            await conn.send_packed_command(command(b"MGET", *markers))
            found = await _reply(conn)
            if not isinstance(found, list) or len(found) != len(markers):
                raise redis.exceptions.ResponseError(f"unexpected MGET reply {found!r:.200}")
            new = [
                (packed, marker)
                for packed, marker, value in zip(candidates.values(), markers, found, strict=True)
                if value is None
            ]
        if not new:
            # published before, maybe by a try whose WAIT failed: wait for the replicas again
            await conn.send_packed_command([command(b"UNWATCH"), *self._wait])
            if isinstance(reply := await _reply(conn), Exception):
                raise reply
            await self._replicated(conn)
            return

        # round trip 2: the transaction, as a list of byte strings (payloads referenced, not copied)
        entry_ids = _next_ids(last, now_ms, len(new))
        head = bulk(b"XADD") + bulk(stream) + bulk(b"MAXLEN") + bulk(b"~") + self._maxlen
        chunks = [command(b"MULTI")]
        state: dict[str, bytes | None] = {}
        for ((event, fields, count), _marker), entry_id in zip(new, entry_ids, strict=True):
            chunks.append(b"*%d\r\n%b%b" % (count + 6, head, bulk(entry_id)))
            chunks += fields
            removed = event.type.endswith(_REMOVED_TYPE_SUFFIX)
            state[event.subject] = None if removed else entry_id
        commands = [
            command(
                b"EVAL",
                _MARKER_SCRIPT,
                str(len(new)).encode(),
                *[marker for _event, marker in new],
                self._window,
                *entry_ids,
            )
        ]
        present = [
            part
            for key, entry in state.items()
            if entry is not None
            for part in (key.encode(), entry)
        ]
        gone = [key.encode() for key, entry in state.items() if entry is None]
        if present:
            commands.append(command(b"HSET", items, *present))
        if gone:
            commands.append(command(b"HDEL", items, *gone))
        # replies: MULTI's, one per queued command (XADDs, EVAL, HSET/HDEL), then EXEC's
        replies = 1 + len(new) + len(commands)
        await conn.send_packed_command([*chunks, *commands, command(b"EXEC"), *self._wait])
        meanwhile()
        queued = [await _reply(conn) for _ in range(replies)]
        try:
            results = await _exec_reply(conn)
        except redis.exceptions.ExecAbortError as exc:
            # a command was refused while queued (OOM, ACL, syntax): nothing ran
            raise next((r for r in queued if isinstance(r, Exception)), exc) from None
        if results is None:
            raise redis.exceptions.WatchError(
                f"{stream.decode()} or {items.decode()} changed during the transaction"
            )
        if not isinstance(results, list) or len(results) != replies - 1:
            raise redis.exceptions.ResponseError(f"unexpected EXEC reply {results!r:.200}")
        for result in results:
            if isinstance(result, Exception):
                raise result
        if results[: len(new)] != entry_ids:
            raise redis.exceptions.ResponseError(
                f"XADD returned other entry ids than the ones requested: "
                f"{results[: len(new)]!r:.200} instead of {entry_ids!r:.200}"
            )
        await self._replicated(conn)

    async def _replicated(self, conn: AbstractConnection) -> None:
        """Read the reply of the ``WAIT`` sent after the transaction (if replicas are asked
        for): fewer replicas than asked is a :class:`NotReplicated` error (the publish fails,
        and its retry waits again; the markers keep it free of duplicates)."""
        if not self._wait:
            return
        reply = await _reply(conn)
        if isinstance(reply, Exception):
            raise reply
        if not isinstance(reply, int) or reply < self._wait_replicas:
            raise NotReplicated(
                f"the write reached {reply} of the {self._wait_replicas} replicas asked for "
                f"(WAIT, {self._wait_ms} ms): not acknowledged, to be retried"
            )

    async def read_published(self, source_name: str) -> Published:
        """What the stream holds of ``source_name`` (:mod:`bridge.sinks.redis_recovery`)."""
        from bridge.sinks.redis_recovery import read_published

        validate_source_name(source_name)
        if self._client is None:
            await self.connect()
        assert self._client is not None
        cfg = self.config
        try:
            return await read_published(
                self._client,
                redis_stream_key(source_name, cfg.stream_prefix),
                items_key(source_name, cfg.stream_prefix),
                maxlen=cfg.maxlen,
            )
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise PublishError(
                f"Redis {self.description}: cannot read what the stream holds of "
                f"{source_name!r}: {_describe(exc)}"
            ) from exc

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """Whether the server answers now (``PING``), for readiness; never raises."""
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self._client.ping())
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            return False


# Replies are read without a timeout of their own (it costs more than parsing a short reply):
# publish() bounds all its round trips together.


async def _reply(conn: AbstractConnection) -> object:
    """The next reply, an error reply returned as its exception (so the others still get read)."""
    try:
        reply: object = await conn.read_response(disable_decoding=True, timeout=math.inf)
    except redis.exceptions.ResponseError as exc:
        return exc
    return reply


async def _exec_reply(conn: AbstractConnection) -> object:
    """The reply of ``EXEC``: a list of results, or None when a watched key changed."""
    reply: object = await conn.read_response(disable_decoding=True, timeout=math.inf)
    return reply


def _read_result(reply: object) -> tuple[tuple[int, int], int]:
    """The stream's last entry id and the server time (ms), from :data:`READ_SCRIPT`."""
    match reply:
        case [bytes(last), int(now_ms)]:
            ms, _, seq = last.partition(b"-")
            return (int(ms), int(seq)), now_ms
    raise redis.exceptions.ResponseError(f"unexpected reply of the read script {reply!r:.200}")


_READ_SCRIPT = READ_SCRIPT.encode()
_MARKER_SCRIPT = MARKER_SCRIPT.encode()
_MAX_SEQ = (1 << 64) - 1


def _next_ids(last: tuple[int, int], now_ms: int, count: int) -> list[bytes]:
    """``count`` increasing entry ids above ``last``, as ``XADD *`` would have made them at
    ``now_ms``: the current millisecond, or the last id's when the clock is behind it."""
    ms = max(now_ms, last[0])
    seq = last[1] + 1 if ms == last[0] else 0
    if seq + count - 1 > _MAX_SEQ:
        ms, seq = ms + 1, 0
    return [b"%d-%d" % (ms, seq + i) for i in range(count)]


def _describe(exc: BaseException) -> str:
    return describe_error(exc)
