"""``NatsSink``: publish CloudEvents to a NATS JetStream stream.

Every item has its own subject, ``<subject_prefix>.<source-name>.<item-token>`` (see
:mod:`bridge.subjects`), so a consumer with ``DeliverPolicy.LAST_PER_SUBJECT`` reads the current
state of every item. ``Nats-Msg-Id`` is the CloudEvent id: JetStream drops a copy published
again within ``duplicate_window_s`` and acknowledges it with ``duplicate: true``, which counts as
success. Content modes:

* ``binary`` (default): ``ce-*`` headers and ``content-type: application/json``, the data as
  body (CloudEvents NATS binding, binary mode). Header values travel as UTF-8; the NATS client
  strips leading and trailing blanks and turns CR/LF into spaces, so ``ce-subject`` of a key
  with such characters differs from the key (the subject token always encodes it exactly).
* ``structured``: the whole event as JSON, ``content-type: application/cloudevents+json``.

A batch is pipelined: every message is sent before any acknowledgement is awaited, then all
acknowledgements are awaited together, at most ``ack_timeout_s`` after the last one was sent.
A missing or negative acknowledgement fails the whole batch with :class:`PublishError`; the
caller publishes the batch again and the messages that did land are dropped as duplicates.

The stream is created when missing (file storage, limits retention, discard old). An existing
stream is checked: when its subjects do not cover ``<subject_prefix>.>`` the subject filter is
added, and differing limits are updated to the configured ones. What the server refuses
(changing replicas on a single server, a subject owned by another stream, a mirror...) is a
:class:`PublishError` that says what to change.

Retention: by default nothing expires by age or size and each item keeps its last
``max_msgs_per_subject`` messages, so the stream always holds the current state of every item
(the last message of a removed item is its ``Removed`` event). ``max_age_s`` and ``max_bytes``
bound the stream further, at the price of forgetting items that did not change for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig

from bridge.cloudevents import CloudEvent
from bridge.errors import ConfigError, PublishError
from bridge.subjects import DEFAULT_SUBJECT_PREFIX, nats_subject

__all__ = ["DEFAULT_STREAM", "STRUCTURED_CONTENT_TYPE", "NatsSink", "NatsSinkConfig"]

log = logging.getLogger(__name__)

DEFAULT_STREAM = "KOPRS_EXTERNAL"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
MSG_ID_HEADER = "Nats-Msg-Id"
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)
_FORBIDDEN_IN_TOKEN = frozenset(".*> \t\r\n")

ContentMode = Literal["binary", "structured"]


@dataclass(kw_only=True, frozen=True)
class NatsSinkConfig:
    """Where and how :class:`NatsSink` publishes."""

    url: str = "nats://127.0.0.1:4222"
    """Server URL; several are separated by commas. May carry credentials (``user:pass@`` or a
    token): they are never logged, :attr:`NatsSink.description` replaces them with ``***``."""

    stream: str = DEFAULT_STREAM
    """JetStream stream name; created when missing."""

    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    """Events go to ``<subject_prefix>.<source-name>.<item-token>``; the stream covers
    ``<subject_prefix>.>``."""

    content_mode: ContentMode = "binary"
    """``binary`` (``ce-*`` headers, data as body) or ``structured`` (one JSON document)."""

    duplicate_window_s: float = 120.0
    """How long JetStream remembers a ``Nats-Msg-Id`` to drop a republished copy. A crashed
    publish must be retried within this window to stay free of duplicates."""

    max_age_s: float | None = None
    """Drop messages older than this; ``None`` (default) keeps them, so the latest message of
    every item stays available. Must not be below ``duplicate_window_s``."""

    max_bytes: int | None = None
    """Size limit of the whole stream (oldest messages go first); ``None``: unlimited."""

    max_msgs_per_subject: int | None = 16
    """Messages kept per item (subject); older ones are dropped. ``None``: unlimited. The
    default keeps a short history per item while bounding the stream by the number of items."""

    replicas: int = 1
    """Stream replicas (1 on a single server; 3 on a cluster for fault tolerance)."""

    ack_timeout_s: float = 5.0
    """How long to wait for the acknowledgements of a batch after its last message was sent,
    and for a lost connection to come back before a publish fails."""

    connect_timeout_s: float = 5.0
    """Bound on the first connection (and on each stream-management request)."""

    reconnect_wait_s: float = 1.0
    """Pause between reconnection attempts after the connection was lost. The client never
    gives up reconnecting; publishes fail meanwhile."""

    def __post_init__(self) -> None:
        if self.content_mode not in ("binary", "structured"):
            raise ConfigError(
                f"nats sink: content_mode must be 'binary' or 'structured', not "
                f"{self.content_mode!r}"
            )
        if not self.stream or any(c in _FORBIDDEN_IN_TOKEN for c in self.stream):
            raise ConfigError(
                f"nats sink: stream {self.stream!r} must be non-empty, without '.', '*', '>' "
                "or whitespace"
            )
        tokens = self.subject_prefix.split(".")
        if not all(tokens) or any(c in _FORBIDDEN_IN_TOKEN - {"."} for c in self.subject_prefix):
            raise ConfigError(
                f"nats sink: subject_prefix {self.subject_prefix!r} must be dot-separated "
                "non-empty tokens without '*', '>' or whitespace"
            )
        for name in ("duplicate_window_s", "ack_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"nats sink: {name} must be > 0 seconds, got {value!r}")
        if not self.reconnect_wait_s >= 0:
            raise ConfigError(f"nats sink: reconnect_wait_s must be >= 0, not {self.reconnect_wait_s!r}")
        if self.max_age_s is not None and self.max_age_s < self.duplicate_window_s:
            raise ConfigError(
                f"nats sink: max_age_s ({self.max_age_s}) must be >= duplicate_window_s "
                f"({self.duplicate_window_s}) or None"
            )
        for name in ("max_bytes", "max_msgs_per_subject"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"nats sink: {name} must be >= 1 or None, got {value!r}")
        if self.replicas < 1:
            raise ConfigError(f"nats sink: replicas must be >= 1, got {self.replicas!r}")

    @property
    def servers(self) -> list[str]:
        return [part.strip() for part in self.url.split(",") if part.strip()]

    def stream_config(self) -> StreamConfig:
        """The stream this sink creates (see the module docstring)."""
        return StreamConfig(
            name=self.stream,
            description="koprs-bridge CloudEvents (one subject per item)",
            subjects=[f"{self.subject_prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_s,
            **self._limits(),
        )

    def _limits(self) -> dict[str, float | int]:
        return {
            "max_age": self.max_age_s or 0.0,
            "max_bytes": self.max_bytes or -1,
            "max_msgs_per_subject": self.max_msgs_per_subject or -1,
        }


def redact_url(url: str) -> str:
    """``url`` with its userinfo (user, password or token) replaced by ``***`` and no query."""
    redacted = []
    for part in url.split(","):
        split = urlsplit(part.strip())
        netloc = split.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rpartition("@")[2]
        redacted.append(urlunsplit((split.scheme, netloc, split.path, "", "")))
    return ",".join(redacted)


def subject_filter_covers(pattern: str, prefix: str) -> bool:
    """Whether every subject under ``<prefix>.>`` matches the stream subject ``pattern``."""
    wanted = prefix.split(".")
    for i, token in enumerate(pattern.split(".")):
        if token == ">":
            return i <= len(wanted)
        if i >= len(wanted) or (token != "*" and token != wanted[i]):
            return False
    return False


class NatsSink:
    """Publishes to JetStream; see the module docstring. ``connect()`` before ``publish()``."""

    def __init__(self, config: NatsSinkConfig | None = None) -> None:
        self.config = config or NatsSinkConfig()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connected = asyncio.Event()
        self._stream_ready = False
        self._lock = asyncio.Lock()
        if self.config.content_mode == "binary":
            self._encode = _encode_binary
        else:
            self._encode = _encode_structured

    @property
    def description(self) -> str:
        return f"{redact_url(self.config.url)} stream {self.config.stream}"

    def __repr__(self) -> str:
        return f"<NatsSink {self.description}>"

    async def connect(self) -> None:
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                await self._open()
            if not self._stream_ready:
                await self._ensure_stream()

    async def _open(self) -> None:
        cfg = self.config
        nc = Client()

        async def on_disconnected() -> None:
            self._connected.clear()
            if nc is self._nc:  # not while closing
                log.warning("disconnected from NATS %s; reconnecting", self.description)

        async def on_reconnected() -> None:
            self._connected.set()
            log.info("reconnected to NATS %s", self.description)

        async def on_error(exc: Exception) -> None:
            log.debug("NATS %s: %s", self.description, type(exc).__name__)

        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=cfg.servers,
                    name="koprs-bridge",
                    connect_timeout=math.ceil(cfg.connect_timeout_s),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=cfg.reconnect_wait_s,  # type: ignore[arg-type]
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                ),
                timeout=cfg.connect_timeout_s,
            )
        except (*_NATS_ERRORS, ValueError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise PublishError(
                f"cannot connect to NATS {self.description}: {_describe(exc)}"
            ) from exc
        self._nc = nc
        self._js = nc.jetstream(timeout=cfg.connect_timeout_s)
        self._connected.set()
        self._stream_ready = False

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        cfg = self.config
        try:
            try:
                info = await self._js.stream_info(cfg.stream)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(cfg.stream_config())
                log.info("created stream %s on %s", cfg.stream, self.description)
                self._stream_ready = True
                return
            current = info.config
            changes = _stream_changes(current, cfg)
            if changes:
                await self._js.update_stream(current.evolve(**changes))
                log.info(
                    "updated stream %s on %s: %s", cfg.stream, self.description, sorted(changes)
                )
        except nats.js.errors.APIError as exc:
            raise PublishError(
                f"NATS {self.description}: cannot create or update the stream to cover "
                f"{cfg.subject_prefix}.> with the configured limits: {_describe(exc)} "
                "(fix or delete the stream, or change the sink's stream/subject_prefix/limits)"
            ) from exc
        except _NATS_ERRORS as exc:
            raise PublishError(
                f"NATS {self.description}: stream check failed: {_describe(exc)}"
            ) from exc
        self._stream_ready = True

    async def _ready(self) -> JetStreamContext:
        if self._nc is None or self._nc.is_closed or not self._stream_ready:
            await self.connect()
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), self.config.ack_timeout_s)
            except TimeoutError:
                raise PublishError(
                    f"NATS {self.description}: not connected (reconnecting); "
                    f"gave up after {self.config.ack_timeout_s} s"
                ) from None
        assert self._js is not None
        return self._js

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        js = await self._ready()
        cfg = self.config
        prefix = cfg.subject_prefix
        stall_s = cfg.ack_timeout_s
        encode = self._encode
        futures: list[asyncio.Future[PubAck]] = []
        try:
            for event in events:
                headers, body = encode(event)
                futures.append(
                    await js.publish_async(
                        nats_subject(source_name, event.subject, prefix),
                        body,
                        wait_stall=stall_s,
                        headers=headers,
                    )
                )
        except _NATS_ERRORS as exc:
            for future in futures:
                future.cancel()
            raise PublishError(
                f"NATS {self.description}: {len(events)} events of {source_name!r} not "
                f"acknowledged: sending failed after {len(futures)}: {_describe(exc)}"
            ) from exc
        await self._await_acks(source_name, futures)

    async def _await_acks(self, source_name: str, futures: list[asyncio.Future[PubAck]]) -> None:
        timeout_s = self.config.ack_timeout_s
        _done, pending = await asyncio.wait(futures, timeout=timeout_s)
        for future in pending:
            future.cancel()
        failed = len(pending)
        first_error: BaseException | None = None
        for future in futures:
            if future.cancelled() or future in pending:
                continue
            exc = future.exception()
            if exc is not None:
                failed += 1
                first_error = first_error or exc
        if not failed:
            return
        if isinstance(first_error, nats.js.errors.NoStreamResponseError):
            self._stream_ready = False  # deleted meanwhile: check (recreate) it next time
        reason = (
            f"first error: {_describe(first_error)}"
            if first_error is not None
            else f"no acknowledgement within {timeout_s} s"
        )
        raise PublishError(
            f"NATS {self.description}: {failed} of {len(futures)} events of {source_name!r} "
            f"not acknowledged ({reason})"
        ) from first_error

    async def aclose(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._connected.clear()
        self._stream_ready = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*_NATS_ERRORS):
                await asyncio.wait_for(nc.close(), self.config.connect_timeout_s)


def _encode_binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    headers, body = event.to_binary()
    headers[MSG_ID_HEADER] = event.id
    return headers, body


def _encode_structured(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    return (
        {MSG_ID_HEADER: event.id, "content-type": STRUCTURED_CONTENT_TYPE},
        event.to_structured(),
    )


def _stream_changes(current: StreamConfig, cfg: NatsSinkConfig) -> dict[str, object]:
    """What to update on an existing stream so that it matches ``cfg``."""
    changes: dict[str, object] = {}
    subjects = list(current.subjects or [])
    if not any(subject_filter_covers(s, cfg.subject_prefix) for s in subjects):
        changes["subjects"] = [*subjects, f"{cfg.subject_prefix}.>"]
    if not math.isclose(current.duplicate_window or 0.0, cfg.duplicate_window_s):
        changes["duplicate_window"] = cfg.duplicate_window_s
    limits = cfg._limits()
    if not math.isclose(current.max_age or 0.0, limits["max_age"]):
        changes["max_age"] = limits["max_age"]
    for name in ("max_bytes", "max_msgs_per_subject"):
        have = getattr(current, name)
        if (have if have is not None and have > 0 else -1) != limits[name]:
            changes[name] = limits[name]
    if (current.num_replicas or 1) != cfg.replicas:
        changes["num_replicas"] = cfg.replicas
    return changes


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{exc.description} (code {exc.err_code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
