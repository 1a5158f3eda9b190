"""``RedisSink``: publish CloudEvents to Redis Streams, one stream per source.

Keys, for a source ``S`` and the default ``stream_prefix`` ``koprs:external:``:

* ``koprs:external:S``: the stream, trimmed with ``XADD MAXLEN ~ maxlen`` (approximate, cheap).
* ``koprs:external:S:ids:<event-id>``: dedup marker of one event id, holding its entry id,
  expiring after ``dedup_window_s``. An event whose marker exists is not added again.
* ``koprs:external:S:items``: hash of the current items, field = the item key (the
  CloudEvent ``subject``), value = the stream entry id of its latest event; a ``Removed`` event
  deletes the field. Consumers list current state from it, then read the stream after the
  largest id they saw. ``MAXLEN`` trimming can drop the entry of an item that has not changed
  for long, so size ``maxlen`` above the number of items if consumers need every entry.

Entry fields:

* ``binary`` content mode (default): the context attributes as fields named like the binary
  headers, ``ce-specversion``, ``ce-id``, ``ce-source``, ``ce-type``, ``ce-subject``,
  ``ce-time``, ``ce-dataschema`` (and ``ce-traceparent`` when tracing), ``content-type``
  (the ``datacontenttype``, ``application/json``), and ``data``: the data as JSON bytes.
* ``structured`` content mode: one field ``event``, the whole event as JSON (CloudEvents JSON
  format).

One Lua script does, per event and atomically: skip it if its dedup marker exists, else
``XADD``, set the marker (``EX dedup_window_s``) and update the items hash. The marker is set
after the ``XADD``, so a script that failed half-way can at worst add an event twice when
retried, never lose one. A batch is sent as a pipeline of script calls (one per 500 events),
so it costs one round trip. A Redis error (refused connection, timeout, an unexpected reply)
is a :class:`PublishError` naming the server, its password hidden.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bridge.cloudevents import CloudEvent
from bridge.errors import ConfigError, PublishError
from bridge.subjects import REDIS_STREAM_PREFIX, redis_stream_key, validate_source_name

__all__ = [
    "EVENTS_PER_CALL",
    "PUBLISH_SCRIPT",
    "ContentMode",
    "RedisSink",
    "RedisSinkConfig",
    "items_key",
    "redact_url",
]

log = logging.getLogger(__name__)

ContentMode = Literal["binary", "structured"]
EVENTS_PER_CALL = 500
"""Events per script call; a batch is split into calls sent in one pipeline."""
_REMOVED_TYPE_SUFFIX = ".removed.v1"

PUBLISH_SCRIPT = """
-- KEYS[1] stream, KEYS[2] items hash, KEYS[2 + i] dedup marker of event i
-- ARGV[1] maxlen, ARGV[2] dedup window (s), then per event:
--   removed ('1' or '0'), item key, number of fields n, n field/value pairs
local stream, items = KEYS[1], KEYS[2]
local maxlen, window = ARGV[1], ARGV[2]
local a = 3
local added = 0
for k = 3, #KEYS do
  local removed, item, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first = a + 3
  local last = first + 2 * n - 1
  a = last + 1
  if redis.call('EXISTS', KEYS[k]) == 0 then
    local entry = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, last))
    redis.call('SET', KEYS[k], entry, 'EX', window)
    if removed == '1' then
      redis.call('HDEL', items, item)
    else
      redis.call('HSET', items, item, entry)
    end
    added = added + 1
  end
end
return added
"""


@dataclass(kw_only=True, frozen=True)
class RedisSinkConfig:
    """Where and how :class:`RedisSink` publishes."""

    url: str = "redis://127.0.0.1:6379/0"
    """``redis://`` or ``rediss://`` URL; may carry a password, which is never logged:
    :attr:`RedisSink.description` shows it as ``***``."""

    stream_prefix: str = REDIS_STREAM_PREFIX
    """Prefix of every key: the stream of source ``S`` is ``<stream_prefix>S``."""

    maxlen: int = 100_000
    """Approximate length bound of each stream (``XADD MAXLEN ~``); oldest entries go first."""

    dedup_window_s: float = 86_400.0
    """How long an event id is remembered to drop a republished copy (one small key per
    event). A failed publish must be retried within this window to stay free of duplicates."""

    content_mode: ContentMode = "binary"
    """``binary``: attributes as ``ce-*`` fields plus ``data``; ``structured``: one ``event``
    field with the whole event as JSON."""

    timeout_s: float = 5.0
    """Bound on one publish (all its round trips and one reconnection)."""

    connect_timeout_s: float = 5.0
    """Bound on opening a connection."""

    def __post_init__(self) -> None:
        if self.content_mode not in ("binary", "structured"):
            raise ConfigError(
                f"redis sink: content_mode must be 'binary' or 'structured', not "
                f"{self.content_mode!r}"
            )
        if urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"redis sink: url must start with redis://, rediss:// or unix://, "
                f"not {redact_url(self.url)!r}"
            )
        if self.maxlen < 1:
            raise ConfigError(f"redis sink: maxlen must be >= 1, got {self.maxlen!r}")
        for name in ("dedup_window_s", "timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"redis sink: {name} must be > 0 seconds, got {value!r}")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` and without query parameters."""
    split = urlsplit(url)
    netloc = split.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        # a lone userinfo (redis://secret@host) may be a password too: hide it
        netloc = f"{user}:***@{host}" if has_password else f"***@{host}"
    return urlunsplit((split.scheme, netloc, split.path, "", ""))


def items_key(source_name: str, prefix: str = REDIS_STREAM_PREFIX) -> str:
    """The hash of a source's current items (see the module docstring)."""
    return f"{redis_stream_key(source_name, prefix)}:items"


class RedisSink:
    """Publishes to Redis Streams; see the module docstring. ``publish()`` connects if needed."""

    def __init__(self, config: RedisSinkConfig | None = None) -> None:
        self.config = config or RedisSinkConfig()
        self._client: redis.asyncio.Redis | None = None
        self._sha: str | None = None
        self._fields = (
            _binary_fields if self.config.content_mode == "binary" else _structured_fields
        )

    @property
    def description(self) -> str:
        return f"{redact_url(self.config.url)} streams {self.config.stream_prefix}*"

    def __repr__(self) -> str:
        return f"<RedisSink {self.description}>"

    async def connect(self) -> None:
        if self._client is None:
            cfg = self.config
            self._client = redis.asyncio.Redis.from_url(
                cfg.url,
                socket_timeout=cfg.timeout_s,
                socket_connect_timeout=cfg.connect_timeout_s,
                # one immediate retry: a pooled connection may be dead after a server restart
                retry=Retry(NoBackoff(), 1),
            )
        try:
            async with asyncio.timeout(self.config.timeout_s):
                self._sha = await self._client.script_load(PUBLISH_SCRIPT)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise PublishError(
                f"Redis {self.description}: cannot connect: {_describe(exc)}"
            ) from exc

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        validate_source_name(source_name)
        if self._client is None or self._sha is None:
            await self.connect()
        assert self._client is not None
        calls = self._calls(source_name, events)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                try:
                    await self._run(calls)
                except redis.exceptions.NoScriptError:
                    # the server lost its script cache (restart, SCRIPT FLUSH): load it again;
                    # running the calls again is safe, duplicates are dropped
                    self._sha = await self._client.script_load(PUBLISH_SCRIPT)
                    await self._run(calls)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise PublishError(
                f"Redis {self.description}: {len(events)} events of {source_name!r} not "
                f"acknowledged: {_describe(exc)}"
            ) from exc

    def _calls(self, source_name: str, events: Sequence[CloudEvent]) -> list[list[Any]]:
        cfg = self.config
        stream = redis_stream_key(source_name, cfg.stream_prefix)
        ids_prefix = f"{stream}:ids:"
        head = [stream, f"{stream}:items"]
        fields = self._fields
        calls = []
        for start in range(0, len(events), EVENTS_PER_CALL):
            chunk = events[start : start + EVENTS_PER_CALL]
            keys = [ids_prefix + event.id for event in chunk]
            args: list[Any] = [cfg.maxlen, math.ceil(cfg.dedup_window_s)]
            for event in chunk:
                pairs = fields(event)
                args += (
                    "1" if event.type.endswith(_REMOVED_TYPE_SUFFIX) else "0",
                    event.subject,
                    len(pairs) // 2,
                    *pairs,
                )
            calls.append([len(head) + len(keys), *head, *keys, *args])
        return calls

    async def _run(self, calls: list[list[Any]]) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command("EVALSHA", self._sha, *call)
        await pipe.execute()

    async def aclose(self) -> None:
        client, self._client, self._sha = self._client, None, None
        if client is not None:
            await client.aclose()


def _binary_fields(event: CloudEvent) -> list[str | bytes]:
    headers, body = event.to_binary()
    pairs: list[str | bytes] = []
    for name, value in headers.items():
        pairs += (name, value)
    pairs += ("data", body)
    return pairs


def _structured_fields(event: CloudEvent) -> list[str | bytes]:
    return ["event", event.to_structured()]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
