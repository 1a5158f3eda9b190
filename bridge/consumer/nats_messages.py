"""How a NATS watch handles messages: what one message means (an item of the list, the end of
the list, a live change, one settled before or undecodable), the :class:`Delivery` handed out for
it, settling it with the server (ack, nak, term), and the waits that end when the watch closes.

:class:`NatsMessages` is the first part of :class:`~bridge.consumer.nats.NatsWatch` (the
behaviour is described there); :class:`Session` is what the watch knows of one pull consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Coroutine
from datetime import datetime
from typing import Any, Literal, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from bridge.connections import ConnectError
from bridge.consumer.base import Delivery, Synced
from bridge.consumer.dead_letters import DEAD_LETTER_MAX_MSGS, dead_letter_fields
from bridge.consumer.decoding import Envelope, UnknownEventTypeError, decode_nats
from bridge.consumer.nats_config import NatsWatchConfig
from bridge.consumer.queueing import QueuedWatch
from bridge.errors import BridgeError, DecodeError
from bridge.events import Added

__all__ = ["RETRYABLE", "NatsMessages", "Session", "Stopped", "error_text"]

log = logging.getLogger("bridge.consumer.nats")  # the watch's logger, for all its parts

RETRYABLE = (nats.errors.Error, OSError, TimeoutError, ConnectError)
"""Errors of the client or the connection: logged, and the step tried again."""
T = TypeVar("T")
SETTLED_KEPT = 4096
"""How many settled messages a session remembers. A server loses acknowledgements it had not
stored when a consumer's leader dies (a node killed, a stream leader change); those are the
last ones sent, far fewer than this."""


class Stopped(Exception):
    """The watch was closed while waiting."""


@dataclasses.dataclass(eq=False)
class Session:
    """One pull consumer and what the watch knows of its progress."""

    consumer: str
    sub: JetStreamContext.PullSubscription
    reconnects: int
    """The client's reconnection count when this consumer was made."""
    stream_created: datetime | None
    floor: int
    """The stream's last sequence just before the consumer was made."""
    through: int = 0
    """A list's: the sequence of the last message of the watched subjects as the stream's
    leader had it before the list's consumer was made (0: none). The list ends no earlier,
    whatever a consumer on a replica that lags behind the leader reports pending."""
    listing: bool = False
    strict: bool = True
    """A list read from a new LAST_PER_SUBJECT consumer: an item seen twice ends it."""
    seen: dict[str, int] = dataclasses.field(default_factory=dict)
    """While listing: subject -> stream sequence of its first message."""
    position: int | None = None
    """Every message up to this stream sequence was delivered (None: the list has not begun)."""
    unsettled: set[int] = dataclasses.field(default_factory=set)
    """Stream sequences delivered and neither acknowledged nor terminated."""
    settled: dict[int, None] = dataclasses.field(default_factory=dict)
    """The stream sequences of the last :data:`SETTLED_KEPT` messages this watch acknowledged
    or terminated through this consumer, oldest first: one coming again is acknowledged
    quietly, not delivered twice."""
    skip_upto: int = 0
    redeliver: frozenset[int] = frozenset()
    """Messages up to ``skip_upto`` not in ``redeliver`` were settled through an earlier
    consumer: they are acknowledged quietly and not delivered again."""
    more: bool = True
    """The last message said more are pending: pull a batch rather than one."""
    then_bind: str | None = None
    """A list read through a short-lived consumer (no acknowledgements) before the watch goes
    on with this durable consumer, after the list's last message."""


class NatsMessages(QueuedWatch):
    """Messages of the watch's pull consumer: queued as deliveries, settled (see the module
    docstring)."""

    def __init__(self, config: NatsWatchConfig) -> None:
        super().__init__()
        self.config = config
        self._stop: asyncio.Future[None] | None = None
        self._js: JetStreamContext | None = None

    # -- messages --

    async def _fetch(self, session: Session) -> list[Msg]:
        batch = self.config.batch_size if session.more else 1
        try:
            return await self._guarded(session.sub.fetch(batch, self.config.fetch_timeout_s))
        except TimeoutError:
            return []
        except nats.js.errors.ServiceUnavailableError:
            return []  # no consumer answers: checked by the caller

    async def _accept(self, session: Session, msg: Msg) -> None:
        """Queue what one message means: maybe the end of the list, maybe a delivery."""
        meta = msg.metadata
        seq = meta.sequence.stream
        session.more = meta.num_pending > 0
        if session.then_bind is not None and not session.listing:
            return  # the list is through: the durable consumer delivers the rest
        before = session.position
        if seq in session.settled:
            # this watch settled it already: the server lost the acknowledgement (a consumer
            # leader that died before storing it, a node back with an older consumer state)
            log.debug(
                "message %d of stream %s was settled already: acknowledged again, not delivered",
                seq, self.config.stream,
            )  # fmt: skip
            await self._quiet(msg)
            self._after(session, meta.num_pending)
            return
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
            elif session.strict and meta.num_delivered == 1 and (before or 0) >= session.through:
                self._end_listing(session)  # changed after the snapshot: the first live change
                if session.then_bind is not None:
                    session.position = before  # the durable consumer delivers it
                    session.unsettled.discard(seq)
                    return
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

    def _after(self, session: Session, num_pending: int) -> None:
        if session.listing and num_pending == 0 and self._listed_through(session):
            self._end_listing(session)

    @staticmethod
    def _listed_through(session: Session) -> bool:
        """Whether the list got to :attr:`Session.through` (else "nothing pending" is the word
        of a replica that lags behind the stream's leader)."""
        return (session.position or 0) >= session.through

    def _end_listing(self, session: Session) -> None:
        session.listing = False
        session.seen = {}
        if session.position is None:
            session.position = session.floor
        self._ready.append(Synced(self.config.sources, listed=True))
        log.info("listed %s: watching", self._what())

    async def _undecodable(self, session: Session, msg: Msg, seq: int, exc: DecodeError) -> None:
        unknown = isinstance(exc, UnknownEventTypeError)
        policy = self.config.on_unknown_type if unknown else self.config.on_decode_error
        where = f"message {seq} of stream {self.config.stream} ({msg.subject})"
        if policy == "raise":
            self._raise_later(exc, where)
            return
        log.warning("skipping %s: %s", where, exc)
        await self._settle(session, msg, seq, "term")

    def _delivery(
        self, session: Session, msg: Msg, seq: int, envelope: Envelope, *, initial: bool
    ) -> Delivery:
        meta = msg.metadata

        async def ack() -> None:
            await self._settle(session, msg, seq, "ack")

        async def nak(delay_s: float) -> None:
            if session.then_bind is None:
                await self._settle(session, msg, seq, "nak", delay_s)
                return
            # listed through a consumer without acknowledgements: this watch delivers it again
            again = dataclasses.replace(delivery, initial=False, attempt=delivery.attempt + 1)
            loop = asyncio.get_running_loop()
            loop.call_later(max(0.0, delay_s), self._ready.append, again)

        async def dead_letter(error: str) -> bool:
            return await self._dead_letter(session, msg, seq, error)

        delivery = Delivery(
            envelope,
            initial=initial,
            attempt=max(1, meta.num_delivered),
            max_attempts=self.config.max_deliveries,
            position=(seq, 0),
            pending=meta.num_pending,
            _ack=ack,
            _nak=nak,
            _dead_letter=dead_letter if self.config.dead_letters else None,
        )
        return delivery

    async def _dead_letter(self, session: Session, msg: Msg, seq: int, error: str) -> bool:
        """Write ``msg`` with ``error`` to the dead-letter stream, then acknowledge it."""
        cfg = self.config
        if self._js is None or self._closed:
            return False
        rest = msg.subject[len(cfg.subject_prefix) :]
        subject = cfg.dead_letter_prefix + rest
        consumer = cfg.durable or session.consumer
        origin = f"{cfg.stream}:{seq}"
        headers = {
            **(msg.headers or {}),
            **dead_letter_fields(error, msg.metadata.num_delivered, consumer, origin),
            "Nats-Msg-Id": f"{origin}:{consumer}",
        }
        try:
            try:
                await self._guarded(
                    self._js.publish(
                        subject, msg.data, timeout=cfg.request_timeout_s,
                        stream=cfg.dead_letter_stream, headers=headers,
                    )
                )  # fmt: skip
            except (nats.js.errors.NoStreamResponseError, nats.js.errors.NotFoundError):
                await self._guarded(self._make_dead_letter_stream())
                await self._guarded(
                    self._js.publish(
                        subject, msg.data, timeout=cfg.request_timeout_s,
                        stream=cfg.dead_letter_stream, headers=headers,
                    )
                )  # fmt: skip
        except (Stopped, *RETRYABLE) as exc:
            log.warning(
                "could not dead-letter message %d of stream %s to %s: %s",
                seq, cfg.stream, cfg.dead_letter_stream, error_text(exc),
            )  # fmt: skip
            return False
        await self._settle(session, msg, seq, "ack")
        return True

    async def _make_dead_letter_stream(self) -> None:
        assert self._js is not None
        cfg = self.config
        log.info(
            "creating stream %s for the dead letters of stream %s (subjects %s.>)",
            cfg.dead_letter_stream, cfg.stream, cfg.dead_letter_prefix,
        )  # fmt: skip
        try:
            await self._js.add_stream(
                StreamConfig(
                    name=cfg.dead_letter_stream,
                    description=f"koprs-bridge dead letters of stream {cfg.stream}",
                    subjects=[f"{cfg.dead_letter_prefix}.>"],
                    storage=StorageType.FILE,
                    retention=RetentionPolicy.LIMITS,
                    discard=DiscardPolicy.OLD,
                    max_msgs=DEAD_LETTER_MAX_MSGS,
                )
            )
        except nats.js.errors.BadRequestError:
            log.debug("stream %s exists already (made meanwhile)", cfg.dead_letter_stream)

    async def _settle(
        self,
        session: Session,
        msg: Msg,
        seq: int,
        how: Literal["ack", "nak", "term"],
        delay_s: float = 0.0,
    ) -> None:
        """Acknowledge, nak or terminate; a failure is logged, not raised: the message is
        delivered again (at least once)."""
        if session.then_bind is not None:
            return  # a consumer without acknowledgements
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
        except Stopped:  # the watch was closed meanwhile: sent, but not confirmed
            log.debug(
                "message %d of stream %s: ack not confirmed (closed)", seq, self.config.stream
            )
            return
        except RETRYABLE as exc:
            log.warning(
                "could not %s message %d of stream %s (it will be delivered again): %s",
                how, seq, self.config.stream, error_text(exc),
            )  # fmt: skip
            return
        if how != "nak":
            session.unsettled.discard(seq)
            session.settled[seq] = None
            if len(session.settled) > SETTLED_KEPT:
                del session.settled[next(iter(session.settled))]

    async def _quiet(self, msg: Msg) -> None:
        with contextlib.suppress(*RETRYABLE):
            await msg.ack()

    # -- waiting --

    def _stopping(self) -> asyncio.Future[None]:
        if self._stop is None:
            self._stop = asyncio.get_running_loop().create_future()
            if self._closed:
                self._stop.set_result(None)
        return self._stop

    async def _guarded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro``, unless the watch is closed first (then raise Stopped)."""
        task = asyncio.ensure_future(coro)
        waiting: set[asyncio.Future[Any]] = {task, self._stopping()}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, *RETRYABLE):
                    await task
        if task.cancelled():
            raise Stopped
        return task.result()

    async def _sleep(self, delay_s: float) -> None:
        await asyncio.wait({self._stopping()}, timeout=delay_s)

    def _what(self) -> str:
        return f"sources {', '.join(self.config.sources)}" if self.config.sources else "all sources"


def error_text(exc: BaseException) -> str:
    """An error in words, for logs and messages."""
    if isinstance(exc, BridgeError):
        return str(exc)
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{exc.description} (code {exc.err_code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
