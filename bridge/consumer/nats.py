"""``NatsWatch``: list-then-watch over the JetStream stream :class:`~bridge.sinks.nats.NatsSink`
writes.

``watch_nats(url_or_client, ["files", "web"], durable="operator")`` yields, as a
:class:`~bridge.consumer.base.Watch`:

1. **The list**: one :class:`Delivery` (``initial=True``) per live item: its latest event, with
   the change turned into an ``Added`` (the CloudEvent context, id and type included, is kept),
   as the interface prescribes. Items whose latest event is ``Removed`` are not listed.
2. **Synced**, once for all sources.
3. **Live changes**, strictly after the list: no gap, no duplicate.

One pull consumer serves both phases. It is created with ``DeliverPolicy.LAST_PER_SUBJECT`` over
``<prefix>.<source>.>`` per source (``<prefix>.>`` without sources), so the server takes the
snapshot: it delivers the last message of every item as of the moment it created the consumer,
in stream order, then every later message. The list ends at the first of

* a message that reports nothing pending after it (``num_pending == 0``);
* an item seen a second time: it changed after the snapshot, so everything before it was the
  list, and this message is the first live change;
* an empty pull after which the server reports nothing pending (a listed message deleted
  meanwhile leaves no message to carry ``num_pending == 0``).

Changes published while the list is read are therefore either part of the list (an item that
appeared after the snapshot, first seen here) or live changes after :class:`Synced`, never both
and never neither: every listed item is the item's latest event as of the list's last message.
A stream keeping a single message per subject (``max_msgs_per_subject: 1``) can drop a listed
message that changed during the list before it is read: that item then comes as a live change.

Every delivery, listed or live, is a JetStream message with explicit acknowledgement:
``ack()`` settles it (by default it waits until the server confirmed: ``confirm_acks``),
``nak(delay)`` has the server deliver it again after ``delay``, and one neither acked nor naked
comes again after ``ack_wait_s``. Listed ``Removed`` events are acknowledged by the watch. A
failed acknowledgement is logged, not raised (the message comes again: at least once); once the
watch is closed, ``ack()`` sends without waiting for the confirmation.

**Durable** (``durable="name"``): the consumer is named exactly so and survives restarts of
the watch and of the server. When it does not exist yet it is created, and the list is read
through it, so a crash during the list resumes within the list. When it exists, the watch
resumes from its acknowledgement floor (what was delivered but not acknowledged comes again) and
does **not** list again: :class:`Synced` comes at once, then the rest. A cache that lives in
memory wants the list on every start: give it no durable name (or a new one). Fan-out: every
durable name gets every event; watches sharing one name (other tasks, other processes) share its
messages, each message going to one of them. An existing consumer with other filter subjects is
a :class:`~bridge.errors.ConfigError` (delete it, or pick another name).

**Without a durable name** an ephemeral consumer is used; the server deletes it
``inactive_threshold_s`` after the watch stopped pulling, and :meth:`NatsWatch.aclose` deletes
it at once. Every start lists.

**Outages** (like kube-rs' watcher, the watch recovers by itself): errors are logged and retried
with exponential backoff up to ``retry_max_s``; the client reconnects forever. A durable consumer
simply goes on. An ephemeral consumer's position is not kept by the server across its restart,
so after a reconnection the watch deletes it and creates a new one starting where the watch
was: at the oldest message it delivered that was not settled (ack/term), skipping the settled
ones after it, so nothing is lost and nothing settled comes twice. When the messages in between
may be gone (the stream's first message is after that position and the stream has age, byte or
message-count limits, or the stream was deleted and created again) the watch lists again
instead: initial deliveries, then a new :class:`Synced` (a
:class:`~bridge.consumer.reflector.Reflector` drops what the new list lacks). A consumer lost in
the middle of the list goes on reading from where it was, after the snapshot: items changed
meanwhile may then come once more before :class:`Synced`, as their later events. A durable
consumer deleted while the watch runs is created again the same way.

**Undecodable messages** (not a koprs CloudEvent, or of a type or schema version this version
does not know) are logged and terminated (``term``: never delivered again); with
``on_decode_error="raise"`` (``on_unknown_type`` for the latter) the
:class:`~bridge.errors.DecodeError` is raised by the iteration instead, the message is left
unacknowledged (delivered again after ``ack_wait_s``) and the next iteration goes on after it.

If a client is passed instead of a URL it is not closed by :meth:`NatsWatch.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
from collections import deque
from collections.abc import Coroutine, Iterable
from datetime import datetime
from typing import Any, Literal, Self, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamInfo

from bridge.connections import ConnectError, connect_nats, describe_error
from bridge.consumer.base import Delivery, Synced, WatchItem
from bridge.consumer.decoding import Envelope, UnknownEventTypeError, decode_nats
from bridge.errors import BridgeError, ConfigError, DecodeError
from bridge.events import Added
from bridge.secrets import redact_url
from bridge.service.config import AuthConfig, TlsConfig
from bridge.sinks.nats import DEFAULT_STREAM
from bridge.subjects import DEFAULT_SUBJECT_PREFIX, validate_source_name

__all__ = ["NatsWatch", "NatsWatchConfig", "watch_nats"]

log = logging.getLogger(__name__)

_RETRYABLE = (nats.errors.Error, OSError, TimeoutError, ConnectError)
_STREAM_NOT_FOUND = 10059
_CONSUMER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_FIRST_RETRY_S = 0.05
_NEEDS_AN_OPERATOR = ("authorization violation", "permissions violation", "TLS")
T = TypeVar("T")
ErrorPolicy = Literal["skip", "raise"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class NatsWatchConfig:
    """What :class:`NatsWatch` reads and how (see the module docstring)."""

    sources: tuple[str, ...] = ()
    """Source names to watch; empty: every source under ``subject_prefix``."""
    durable: str | None = None
    """Durable consumer name: position kept by the server, work shared. None: ephemeral."""
    list_first: bool = True
    """List the current items before the live changes (a new consumer only). False: start
    after the stream's last message; :class:`Synced` comes at once."""
    stream: str = DEFAULT_STREAM
    """As the sink's ``stream``."""
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    """As the sink's ``subject_prefix``."""
    on_decode_error: ErrorPolicy = "skip"
    """``skip``: log, terminate the message and go on; ``raise``: raise the DecodeError."""
    on_unknown_type: ErrorPolicy = "skip"
    """The same for a well-formed CloudEvent of a type or schema version not known here."""
    batch_size: int = 256
    """Most messages of one pull while messages are pending (one at a time when caught up, so
    a live change is handed over as soon as it arrives)."""
    fetch_timeout_s: float = 5.0
    """Longest wait of one pull; after an empty one the consumer is checked (still there?
    anything pending?)."""
    ack_wait_s: float = 30.0
    """A delivery neither acknowledged nor naked is delivered again after this (new consumers)."""
    max_ack_pending: int = 1000
    """Most deliveries handed out and not yet settled; the server pauses at this (new
    consumers)."""
    confirm_acks: bool = True
    """``ack()`` waits until the server recorded it (one round trip). False: send and go on (an
    acknowledgement lost in a disconnection means one more delivery)."""
    request_timeout_s: float = 5.0
    """Bound on each JetStream API request and each confirmed acknowledgement."""
    inactive_threshold_s: float = 300.0
    """The server deletes an ephemeral consumer nobody pulled from for this long."""
    reconnect_wait_s: float = 0.5
    """Pause between reconnection attempts of a client the watch made itself."""
    retry_max_s: float = 5.0
    """Backoff after errors: from 0.05 s, doubling up to this."""
    tls: TlsConfig | None = None
    """TLS of a client the watch makes itself (CA, client certificate); see
    :mod:`bridge.connections`."""
    auth: AuthConfig | None = None
    """Credentials of a client the watch makes itself."""

    def __post_init__(self) -> None:
        for name in self.sources:
            try:
                validate_source_name(name)
            except ValueError as exc:
                raise ConfigError(f"nats watch: {exc}") from None
        if self.durable is not None and not _CONSUMER_NAME.match(self.durable):
            raise ConfigError(
                f"nats watch: durable {self.durable!r} must be 1-128 characters of A-Z, a-z, "
                "0-9, '_' or '-'"
            )
        for name in ("on_decode_error", "on_unknown_type"):
            if getattr(self, name) not in ("skip", "raise"):
                raise ConfigError(
                    f"nats watch: {name} must be 'skip' or 'raise', not {getattr(self, name)!r}"
                )
        for name in ("batch_size", "max_ack_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"nats watch: {name} must be an integer >= 1, got {value!r}")
        for name in ("fetch_timeout_s", "ack_wait_s", "request_timeout_s", "inactive_threshold_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"nats watch: {name} must be > 0 seconds, got {value!r}")
        for name in ("reconnect_wait_s", "retry_max_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"nats watch: {name} must be >= 0 seconds, got {value!r}")

    @property
    def filter_subjects(self) -> list[str]:
        """The consumer's filter: one subject per source, or the whole prefix."""
        if not self.sources:
            return [f"{self.subject_prefix}.>"]
        return [f"{self.subject_prefix}.{name}.>" for name in sorted(set(self.sources))]


def watch_nats(
    url_or_client: str | Client,
    sources: Iterable[str] | None = None,
    *,
    durable: str | None = None,
    list_first: bool = True,
    stream: str = DEFAULT_STREAM,
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
    on_decode_error: ErrorPolicy = "skip",
    **options: Any,
) -> NatsWatch:
    """A :class:`NatsWatch`; ``options`` are the other fields of :class:`NatsWatchConfig`."""
    config = NatsWatchConfig(
        sources=tuple(sources or ()),
        durable=durable,
        list_first=list_first,
        stream=stream,
        subject_prefix=subject_prefix,
        on_decode_error=on_decode_error,
        **options,
    )
    return NatsWatch(url_or_client, config)


class _Stopped(Exception):
    """The watch was closed while waiting."""


@dataclasses.dataclass(eq=False)
class _Session:
    """One pull consumer and what the watch knows of its progress."""

    consumer: str
    sub: JetStreamContext.PullSubscription
    reconnects: int
    """The client's reconnection count when this consumer was made."""
    stream_created: datetime | None
    floor: int
    """The stream's last sequence just before the consumer was made."""
    listing: bool = False
    strict: bool = True
    """A list read from a new LAST_PER_SUBJECT consumer: an item seen twice ends it."""
    seen: dict[str, int] = dataclasses.field(default_factory=dict)
    """While listing: subject -> stream sequence of its first message."""
    position: int | None = None
    """Every message up to this stream sequence was delivered (None: the list has not begun)."""
    unsettled: set[int] = dataclasses.field(default_factory=set)
    """Stream sequences delivered and neither acknowledged nor terminated."""
    skip_upto: int = 0
    redeliver: frozenset[int] = frozenset()
    """Messages up to ``skip_upto`` not in ``redeliver`` were settled through an earlier
    consumer: they are acknowledged quietly and not delivered again."""
    more: bool = True
    """The last message said more are pending: pull a batch rather than one."""


class NatsWatch:
    """An async iterator of :data:`WatchItem` over a JetStream stream; see the module docstring.

    Use as an async context manager, or call :meth:`aclose` when done.
    """

    messaging_system = "nats"
    """For the spans of :func:`bridge.consumer.run_handler`."""

    def __init__(self, url_or_client: str | Client, config: NatsWatchConfig | None = None) -> None:
        self.config = config or NatsWatchConfig()
        if isinstance(url_or_client, str):
            self._nc: Client | None = None
            self._url = url_or_client
            self._owns_client = True
            self._where = redact_url(url_or_client)
        else:
            self._nc, self._url, self._owns_client = url_or_client, "", False
            self._where = "NATS"
        self._js: JetStreamContext | None = None
        self._session: _Session | None = None
        self._ready: deque[WatchItem | DecodeError] = deque()
        self._stop: asyncio.Future[None] | None = None
        self._closed = False
        self._waiting_for_stream = False
        self._server_error: str | None = None
        """A permissions violation the server reported (it drops the request: a timeout)."""

    @property
    def sources(self) -> tuple[str, ...]:
        return self.config.sources

    @property
    def consumer_name(self) -> str | None:
        """The name of the consumer in use (the durable name, or the server's ephemeral name)."""
        return self._session.consumer if self._session is not None else self.config.durable

    def __repr__(self) -> str:
        return f"<NatsWatch {self._where} {self.config.stream} consumer {self.consumer_name}>"

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def __anext__(self) -> WatchItem:
        delay = _FIRST_RETRY_S
        while not self._ready:
            if self._closed:
                await self._drop_session()  # one a step made after aclose()
                raise StopAsyncIteration
            try:
                await self._step()
                delay = _FIRST_RETRY_S
            except _Stopped:
                continue
            except _RETRYABLE as exc:
                if self._closed:
                    continue
                if self._nc is not None and self._nc.is_closed and not self._owns_client:
                    raise BridgeError(
                        f"nats watch: the client passed to it was closed ({_describe(exc)})"
                    ) from exc
                self._log_retry(exc, delay)
                await self._sleep(delay)
                delay = min(delay * 2, max(self.config.retry_max_s, _FIRST_RETRY_S))
        item = self._ready.popleft()
        if isinstance(item, DecodeError):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop: an iteration waiting in another task ends; the ephemeral consumer is deleted."""
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
        await self._drop_session()
        if self._owns_client and self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(*_RETRYABLE):
                await self._nc.close()

    async def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._nc is not None and self._nc.is_connected:
            await self._drop(session)

    # -- steps --

    async def _step(self) -> None:
        if self._js is None:
            await self._connect()
        if self._session is None:
            self._session = await self._open(None)
            return
        session = self._session
        msgs = await self._fetch(session)
        if self._reconnects() != session.reconnects:
            if self.config.durable is None:
                # the server may have restarted, and it does not keep an ephemeral consumer's
                # position: discard what it gave (it is not settled: it comes again), recreate
                log.info(
                    "NATS %s reconnected: recreating ephemeral consumer %s of stream %s",
                    self._where, session.consumer, self.config.stream,
                )  # fmt: skip
                self._session = await self._open(session)
                return
            session.reconnects = self._reconnects()
            session.strict = False  # a list goes on from the durable position, as a catch-up
        if msgs:
            for msg in msgs:
                await self._accept(session, msg)
            return
        info = await self._consumer_info(session.consumer)
        if info is None:
            log.warning(
                "consumer %s of stream %s on %s is gone: creating it again",
                session.consumer, self.config.stream, self._where,
            )  # fmt: skip
            self._session = await self._open(session)
        elif session.listing and info.num_pending == 0:
            self._end_listing(session)

    async def _connect(self) -> None:
        if self._nc is None or (self._owns_client and self._nc.is_closed):
            self._nc = await self._new_client()
        self._js = self._nc.jetstream(timeout=self.config.request_timeout_s)

    async def _new_client(self) -> Client:
        cfg = self.config
        where = self._where
        logged: list[str] = []

        async def on_error(exc: Exception) -> None:
            text = describe_error(exc)
            if text.startswith("permissions violation"):
                self._server_error = text
            if text.startswith(_NEEDS_AN_OPERATOR) and text not in logged[-1:]:
                logged.append(text)  # once per distinct cause, not once per reconnection try
                log.warning("NATS %s: %s", where, text)
            else:
                log.debug("NATS %s: %s", where, text)

        async def on_disconnected() -> None:
            if not self._closed:
                log.warning("disconnected from NATS %s; reconnecting", where)

        async def on_reconnected() -> None:
            log.info("reconnected to NATS %s", where)

        return await connect_nats(
            self._url,
            cfg.tls,
            cfg.auth,
            name="koprs-bridge-watch",
            connect_timeout_s=max(1.0, cfg.request_timeout_s),
            reconnect_wait_s=cfg.reconnect_wait_s,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )

    # -- consumers --

    async def _open(self, previous: _Session | None) -> _Session:
        """Make (or bind to) the consumer; after ``previous`` was lost, go on from it."""
        assert self._js is not None
        cfg = self.config
        if previous is not None:
            await self._drop(previous)
        stream = await self._stream_info()
        if cfg.durable is not None:
            info = await self._consumer_info(cfg.durable)
            if info is not None:
                return await self._bind_existing(info, stream, previous)
        if previous is None:
            plan, start = ("list", 0) if cfg.list_first else ("resume", stream.state.last_seq + 1)
        else:
            plan, start = self._resume_plan(previous, stream)
        if plan == "list":
            consumer_config = self._consumer_config(DeliverPolicy.LAST_PER_SUBJECT, None)
        else:
            consumer_config = self._consumer_config(DeliverPolicy.BY_START_SEQUENCE, start)
        try:
            info = await self._js.add_consumer(cfg.stream, consumer_config)
        except nats.js.errors.BadRequestError:
            existing = None if cfg.durable is None else await self._consumer_info(cfg.durable)
            if existing is None:
                raise
            return await self._bind_existing(existing, stream, previous)  # made meanwhile
        session = await self._session_for(info, stream)
        if plan == "list":
            session.listing = True
            log.info("listing %s from stream %s on %s", self._what(), cfg.stream, self._where)
        else:
            session.position = start - 1
            if previous is not None:
                self._carry_over(previous, session, listing=plan == "catch_up")
        if previous is None and plan != "list":
            self._ready.append(Synced(cfg.sources))
        if session.listing and info.num_pending == 0:
            self._end_listing(session)
        return session

    def _resume_plan(self, prev: _Session, stream: StreamInfo) -> tuple[str, int]:
        """``(plan, start)`` after ``prev`` was lost: ``list``, ``catch_up`` or ``resume``."""
        if prev.position is None:
            return "list", 0  # nothing of the list was delivered yet
        start = min([*prev.unsettled, prev.position + 1])
        state = stream.state
        recreated = state.last_seq < prev.position or (
            prev.stream_created is not None
            and stream.created is not None
            and stream.created != prev.stream_created
        )
        if recreated:
            log.warning(
                "stream %s on %s was deleted and created again: %s",
                self.config.stream, self._where,
                "listing again" if self.config.list_first else "reading it from its start",
            )  # fmt: skip
            if self.config.list_first:
                return "list", 0
            prev.unsettled.clear()
            prev.position, prev.skip_upto, prev.redeliver = 0, 0, frozenset()
            return "resume", max(1, state.first_seq)
        if prev.listing:
            return "catch_up", start
        if start < state.first_seq and _drops_from_the_front(stream) and self.config.list_first:
            log.warning(
                "messages of stream %s from sequence %d on may be gone (it starts at %d now): "
                "listing again",
                self.config.stream, start, state.first_seq,
            )  # fmt: skip
            return "list", 0
        return "resume", start

    @staticmethod
    def _carry_over(prev: _Session, session: _Session, *, listing: bool) -> None:
        assert prev.position is not None
        upto = max(prev.position, prev.skip_upto)
        still_due = {seq for seq in prev.redeliver if seq > prev.position}
        session.skip_upto = upto
        session.redeliver = frozenset(prev.unsettled | still_due)
        if listing:
            session.listing, session.strict, session.seen = True, False, prev.seen

    async def _bind_existing(
        self, info: ConsumerInfo, stream: StreamInfo, previous: _Session | None
    ) -> _Session:
        self._check_durable(info)
        session = await self._session_for(info, stream)
        session.position = info.ack_floor.stream_seq if info.ack_floor else 0
        if previous is None:
            log.info(
                "resuming durable consumer %s of stream %s on %s (not listing again)",
                info.name, self.config.stream, self._where,
            )  # fmt: skip
            self._ready.append(Synced(self.config.sources))
        elif previous.listing:
            session.listing, session.strict, session.seen = True, False, previous.seen
        return session

    async def _session_for(self, info: ConsumerInfo, stream: StreamInfo) -> _Session:
        assert self._js is not None
        sub = await self._js.pull_subscribe_bind(consumer=info.name, stream=self.config.stream)
        return _Session(
            consumer=info.name,
            sub=sub,
            reconnects=self._reconnects(),
            stream_created=stream.created,
            floor=stream.state.last_seq,
        )

    def _consumer_config(self, policy: DeliverPolicy, start: int | None) -> ConsumerConfig:
        cfg = self.config
        filters = cfg.filter_subjects
        return ConsumerConfig(
            name=cfg.durable,
            durable_name=cfg.durable,
            description="koprs-bridge watch",
            deliver_policy=policy,
            opt_start_seq=start,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=cfg.ack_wait_s,
            max_ack_pending=cfg.max_ack_pending,
            inactive_threshold=None if cfg.durable else cfg.inactive_threshold_s,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
        )

    def _check_durable(self, info: ConsumerInfo) -> None:
        config = info.config
        have = set(config.filter_subjects or [config.filter_subject or ""]) - {""}
        want = set(self.config.filter_subjects)
        if config.deliver_subject:
            raise ConfigError(
                f"nats watch: consumer {info.name!r} of stream {self.config.stream} is a push "
                "consumer; pick another durable name"
            )
        if have != want and not (not have and want == {f"{self.config.subject_prefix}.>"}):
            raise ConfigError(
                f"nats watch: consumer {info.name!r} of stream {self.config.stream} filters "
                f"{sorted(have) or 'everything'}, not {sorted(want)} (the sources differ): "
                "delete it or pick another durable name"
            )

    async def _stream_info(self) -> StreamInfo:
        assert self._js is not None
        try:
            info = await self._js.stream_info(self.config.stream)
        except nats.js.errors.NotFoundError:
            self._stream_missing()
            raise
        self._waiting_for_stream = False
        return info

    def _stream_missing(self) -> None:
        if not self._waiting_for_stream:
            log.info("stream %s not found on %s: waiting for it", self.config.stream, self._where)
            self._waiting_for_stream = True

    async def _consumer_info(self, name: str) -> ConsumerInfo | None:
        """The consumer's info; None when it does not exist (the stream missing raises)."""
        assert self._js is not None
        try:
            info: ConsumerInfo = await self._js.consumer_info(self.config.stream, name)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                self._stream_missing()
                raise
            return None
        return info

    async def _drop(self, session: _Session) -> None:
        """Unsubscribe; delete an ephemeral consumer (best effort: it expires anyway)."""
        with contextlib.suppress(*_RETRYABLE, ValueError):
            await session.sub.unsubscribe()
        if self.config.durable is None and self._js is not None:
            with contextlib.suppress(*_RETRYABLE):
                await asyncio.wait_for(
                    self._js.delete_consumer(self.config.stream, session.consumer),
                    self.config.request_timeout_s,
                )

    def _reconnects(self) -> int:
        assert self._nc is not None
        return int(self._nc.stats["reconnects"])

    # -- messages --

    async def _fetch(self, session: _Session) -> list[Msg]:
        batch = self.config.batch_size if session.more else 1
        try:
            return await self._guarded(session.sub.fetch(batch, self.config.fetch_timeout_s))
        except TimeoutError:
            return []
        except nats.js.errors.ServiceUnavailableError:
            return []  # no consumer answers: checked by the caller

    async def _accept(self, session: _Session, msg: Msg) -> None:
        """Queue what one message means: maybe the end of the list, maybe a delivery."""
        meta = msg.metadata
        seq = meta.sequence.stream
        session.more = meta.num_pending > 0
        if session.position is None or seq > session.position:
            session.position = seq
        if seq <= session.skip_upto and seq not in session.redeliver:
            await self._quiet(msg)  # settled through an earlier consumer
            self._after(session, meta.num_pending)
            return
        session.unsettled.add(seq)
        initial = False
        if session.listing:
            listed = session.seen.get(msg.subject)
            if listed is None:
                session.seen[msg.subject] = seq
                initial = True
            elif listed == seq:
                initial = True  # a listed message delivered again
            elif session.strict and meta.num_delivered == 1:
                self._end_listing(session)  # changed after the snapshot: the first live change
        try:
            envelope = decode_nats(
                msg.subject, msg.headers, msg.data, subject_prefix=self.config.subject_prefix
            )
        except DecodeError as exc:
            await self._undecodable(session, msg, seq, exc)
            self._after(session, meta.num_pending)
            return
        if initial and envelope.kind == "removed":
            await self._settle(session, msg, seq, "ack")  # gone: not part of the list
        else:
            if initial and envelope.kind != "added":
                envelope = dataclasses.replace(envelope, event=Added(envelope.event.resource))
            self._ready.append(self._delivery(session, msg, seq, envelope, initial=initial))
        self._after(session, meta.num_pending)

    def _after(self, session: _Session, num_pending: int) -> None:
        if session.listing and num_pending == 0:
            self._end_listing(session)

    def _end_listing(self, session: _Session) -> None:
        session.listing = False
        session.seen = {}
        if session.position is None:
            session.position = session.floor
        self._ready.append(Synced(self.config.sources))
        log.info("listed %s: watching", self._what())

    async def _undecodable(self, session: _Session, msg: Msg, seq: int, exc: DecodeError) -> None:
        unknown = isinstance(exc, UnknownEventTypeError)
        policy = self.config.on_unknown_type if unknown else self.config.on_decode_error
        where = f"message {seq} of stream {self.config.stream} ({msg.subject})"
        if policy == "raise":
            error = type(exc)(f"{where}: {exc}")
            error.__cause__ = exc
            self._ready.append(error)
            return
        log.warning("skipping %s: %s", where, exc)
        await self._settle(session, msg, seq, "term")

    def _delivery(
        self, session: _Session, msg: Msg, seq: int, envelope: Envelope, *, initial: bool
    ) -> Delivery:
        async def ack() -> None:
            await self._settle(session, msg, seq, "ack")

        async def nak(delay_s: float) -> None:
            await self._settle(session, msg, seq, "nak", delay_s)

        return Delivery(envelope, initial=initial, _ack=ack, _nak=nak)

    async def _settle(
        self,
        session: _Session,
        msg: Msg,
        seq: int,
        how: Literal["ack", "nak", "term"],
        delay_s: float = 0.0,
    ) -> None:
        """Acknowledge, nak or terminate; a failure is logged, not raised: the message is
        delivered again (at least once)."""
        try:
            if how == "ack" and self.config.confirm_acks and not self._closed:
                await self._guarded(msg.ack_sync(timeout=self.config.request_timeout_s))
            elif how == "ack":
                await msg.ack()
            elif how == "nak":
                await msg.nak(delay=max(0.0, delay_s))
            else:
                await msg.term()
        except nats.errors.MsgAlreadyAckdError:
            log.debug("message %d of stream %s was settled already", seq, self.config.stream)
            return
        except _Stopped:  # the watch was closed meanwhile: sent, but not confirmed
            log.debug(
                "message %d of stream %s: ack not confirmed (closed)", seq, self.config.stream
            )
            return
        except _RETRYABLE as exc:
            log.warning(
                "could not %s message %d of stream %s (it will be delivered again): %s",
                how, seq, self.config.stream, _describe(exc),
            )  # fmt: skip
            return
        if how != "nak":
            session.unsettled.discard(seq)

    async def _quiet(self, msg: Msg) -> None:
        with contextlib.suppress(*_RETRYABLE):
            await msg.ack()

    # -- waiting --

    def _stopping(self) -> asyncio.Future[None]:
        if self._stop is None:
            self._stop = asyncio.get_running_loop().create_future()
            if self._closed:
                self._stop.set_result(None)
        return self._stop

    async def _guarded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro``, unless the watch is closed first (then raise _Stopped)."""
        task = asyncio.ensure_future(coro)
        waiting: set[asyncio.Future[Any]] = {task, self._stopping()}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, *_RETRYABLE):
                    await task
        if task.cancelled():
            raise _Stopped
        return task.result()

    async def _sleep(self, delay_s: float) -> None:
        await asyncio.wait({self._stopping()}, timeout=delay_s)

    # -- logs --

    def _what(self) -> str:
        return f"sources {', '.join(self.config.sources)}" if self.config.sources else "all sources"

    def _log_retry(self, exc: BaseException, delay: float) -> None:
        if isinstance(exc, nats.js.errors.NotFoundError) and self._waiting_for_stream:
            log.debug("stream %s still missing; next look in %.2f s", self.config.stream, delay)
            return
        reason = _describe(exc)
        if isinstance(exc, TimeoutError) and self._server_error is not None:
            reason = f"{reason}; the server reported: {self._server_error}"
        self._server_error = None
        log.warning("NATS watch on %s: %s; trying again in %.2f s", self._where, reason, delay)


def _drops_from_the_front(stream: StreamInfo) -> bool:
    """Whether the stream discards messages by age, size or count (not only per subject)."""
    config = stream.config
    return (config.max_age or 0) > 0 or (config.max_bytes or -1) > 0 or (config.max_msgs or -1) > 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BridgeError):
        return str(exc)
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{exc.description} (code {exc.err_code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
