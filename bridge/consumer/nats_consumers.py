"""How a NATS watch makes its JetStream consumer: a new one (listing first, or from a stream
position), binding to an existing durable one, and a new one after the previous was lost (the
resume plan); checks of the stream and of an existing durable consumer.

:class:`NatsConsumers` is the second part of :class:`~bridge.consumer.nats.NatsWatch` (the
behaviour is described there), after :class:`~bridge.consumer.nats_messages.NatsMessages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.js.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamInfo

from bridge.consumer.base import Synced
from bridge.consumer.nats_config import NatsWatchConfig
from bridge.consumer.nats_messages import RETRYABLE, NatsMessages, Session
from bridge.errors import ConfigError

__all__ = ["NatsConsumers"]

log = logging.getLogger("bridge.consumer.nats")  # the watch's logger, for all its parts

_STREAM_NOT_FOUND = 10059


class NatsConsumers(NatsMessages):
    """The watch's JetStream consumer: made, bound, made again (see the module docstring)."""

    def __init__(self, config: NatsWatchConfig, nc: Client | None, where: str) -> None:
        super().__init__(config)
        self._nc = nc
        self._where = where
        self._waiting_for_stream = False
        self._server_error: str | None = None
        """A permissions violation the server reported (it drops the request: a timeout)."""
        self._last_denied = False
        """The server refused ``get_last_msg`` (permissions): lists end as the consumer says."""

    async def _open(self, previous: Session | None) -> Session:
        """Make (or bind to) the consumer; after ``previous`` was lost, go on from it."""
        assert self._js is not None
        cfg = self.config
        if previous is not None:
            await self._drop(previous)
        stream = await self._stream_info()
        if cfg.durable is not None:
            info = await self._consumer_info(cfg.durable)
            if info is not None:
                if previous is None and cfg.list_first:
                    why = "list_on_resume" if cfg.list_on_resume else self._lost_since(info, stream)
                    if why:
                        return await self._prelist(stream, why)
                return await self._bind_existing(info, stream, previous)
        if previous is None:
            plan, start = ("list", 0) if cfg.list_first else ("resume", stream.state.last_seq + 1)
        else:
            plan, start = self._resume_plan(previous, stream)
        through = 0
        if plan == "list":
            through = await self._last_watched()
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
            session.listing, session.through = True, through
            log.info("listing %s from stream %s on %s", self._what(), cfg.stream, self._where)
        else:
            session.position = start - 1
            if previous is not None:
                self._carry_over(previous, session, listing=plan == "catch_up")
        if previous is None and plan != "list":
            self._ready.append(Synced(cfg.sources, listed=False))
        if session.listing and info.num_pending == 0 and self._listed_through(session):
            self._end_listing(session)
        return session

    async def _last_watched(self) -> int:
        """The stream sequence of the last message of the watched subjects, from the stream's
        leader (0: none): where a list ends at the earliest (:attr:`Session.through`)."""
        assert self._js is not None
        js, stream = self._js, self.config.stream
        if self._last_denied:
            return 0

        async def last(subject: str) -> int:
            try:
                msg = await js.get_last_msg(stream, subject)
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    self._stream_missing()
                    raise
                return 0  # no message of these subjects
            return int(msg.seq or 0)

        try:
            found = await asyncio.gather(*(last(s) for s in self.config.filter_subjects))
        except TimeoutError:
            if not (self._server_error or "").startswith("permissions violation"):
                raise  # an outage: the step is tried again
            self._last_denied = True
            log.warning(
                "NATS %s: not allowed to read the last message of the watched subjects (allow "
                "$JS.API.STREAM.MSG.GET.%s): on a cluster a list may end before the latest "
                "changes, which then come after Synced",
                self._where, stream,
            )  # fmt: skip
            return 0
        return max(found, default=0)

    def _resume_plan(self, prev: Session, stream: StreamInfo) -> tuple[str, int]:
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
            prev.settled.clear()
            prev.position, prev.skip_upto, prev.redeliver = 0, 0, frozenset()
            return "resume", max(1, state.first_seq)
        if prev.listing:
            return "catch_up", start
        if start < state.first_seq and drops_from_the_front(stream) and self.config.list_first:
            log.warning(
                "messages of stream %s from sequence %d on may be gone (it starts at %d now): "
                "listing again",
                self.config.stream, start, state.first_seq,
            )  # fmt: skip
            return "list", 0
        return "resume", start

    @staticmethod
    def _carry_over(prev: Session, session: Session, *, listing: bool) -> None:
        assert prev.position is not None
        upto = max(prev.position, prev.skip_upto)
        still_due = {seq for seq in prev.redeliver if seq > prev.position}
        session.skip_upto = upto
        session.redeliver = frozenset(prev.unsettled | still_due)
        session.settled = prev.settled
        if listing:
            session.listing, session.strict, session.seen = True, False, prev.seen
            session.through = prev.through

    async def _bind_existing(
        self, info: ConsumerInfo, stream: StreamInfo, previous: Session | None
    ) -> Session:
        self._check_durable(info)
        session = await self._session_for(info, stream)
        session.position = info.ack_floor.stream_seq if info.ack_floor else 0
        if previous is None:
            log.info(
                "resuming durable consumer %s of stream %s on %s (not listing again)",
                info.name, self.config.stream, self._where,
            )  # fmt: skip
            self._ready.append(Synced(self.config.sources, listed=False))
        else:
            session.settled = previous.settled  # the server may have lost their acks
            if previous.listing:
                session.listing, session.strict, session.seen = True, False, previous.seen
                session.through = previous.through
        return session

    def _lost_since(self, info: ConsumerInfo, stream: StreamInfo) -> str:
        """Why messages after the durable's acknowledgement floor may be gone (expired,
        trimmed), or ``""``."""
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        first = stream.state.first_seq
        if floor + 1 < first and drops_from_the_front(stream) and stream.state.last_seq >= floor:
            return (
                f"its acknowledgement floor {floor} is before the stream's first message "
                f"{first}: messages it did not get may have expired"
            )
        return ""

    async def _prelist(self, stream: StreamInfo, why: str) -> Session:
        """List through a short-lived consumer; the durable goes on after it
        (:meth:`_continue_durable`)."""
        assert self._js is not None
        assert self.config.durable is not None
        cfg = self.config
        if why != "list_on_resume":
            log.warning(
                "durable consumer %s of stream %s on %s: %s; listing again",
                cfg.durable, cfg.stream, self._where, why,
            )  # fmt: skip
        consumer_config = self._consumer_config(
            DeliverPolicy.LAST_PER_SUBJECT, None, listing_only=True
        )
        through = await self._last_watched()
        info = await self._js.add_consumer(cfg.stream, consumer_config)
        session = await self._session_for(info, stream)
        session.listing, session.then_bind, session.through = True, cfg.durable, through
        log.info(
            "listing %s from stream %s on %s, then going on with durable consumer %s",
            self._what(), cfg.stream, self._where, cfg.durable,
        )  # fmt: skip
        if info.num_pending == 0 and self._listed_through(session):
            self._end_listing(session)
        return session

    async def _continue_durable(self, listed: Session) -> Session:
        """After a list read by :meth:`_prelist`: the durable consumer, its messages up to the
        list's last one acknowledged quietly (the list covers them)."""
        assert self._js is not None
        assert listed.then_bind is not None
        upto = listed.floor if listed.position is None else listed.position
        stream = await self._stream_info()
        info = await self._consumer_info(listed.then_bind)
        if info is None:
            config = self._consumer_config(DeliverPolicy.BY_START_SEQUENCE, upto + 1)
            info = await self._js.add_consumer(self.config.stream, config)
        self._check_durable(info)
        session = await self._session_for(info, stream)
        session.position = session.skip_upto = upto
        await self._drop(listed)
        log.info(
            "going on with durable consumer %s of stream %s after sequence %d",
            info.name, self.config.stream, upto,
        )  # fmt: skip
        return session

    async def _session_for(self, info: ConsumerInfo, stream: StreamInfo) -> Session:
        assert self._js is not None
        sub = await self._js.pull_subscribe_bind(consumer=info.name, stream=self.config.stream)
        return Session(
            consumer=info.name,
            sub=sub,
            reconnects=self._reconnects(),
            stream_created=stream.created,
            floor=stream.state.last_seq,
        )

    def _consumer_config(
        self, policy: DeliverPolicy, start: int | None, *, listing_only: bool = False
    ) -> ConsumerConfig:
        cfg = self.config
        filters = cfg.filter_subjects
        durable = None if listing_only else cfg.durable
        return ConsumerConfig(
            name=durable,
            durable_name=durable,
            description="koprs-bridge watch" + (" (list)" if listing_only else ""),
            deliver_policy=policy,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE if listing_only else AckPolicy.EXPLICIT,
            ack_wait=None if listing_only else cfg.ack_wait_s,
            max_ack_pending=None if listing_only else cfg.max_ack_pending,
            inactive_threshold=None if durable else cfg.inactive_threshold_s,
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

    async def _drop(self, session: Session) -> None:
        """Unsubscribe; delete an ephemeral consumer (best effort: it expires anyway)."""
        with contextlib.suppress(*RETRYABLE, ValueError):
            await session.sub.unsubscribe()
        if (self.config.durable is None or session.then_bind is not None) and self._js:
            with contextlib.suppress(*RETRYABLE):
                await asyncio.wait_for(
                    self._js.delete_consumer(self.config.stream, session.consumer),
                    self.config.request_timeout_s,
                )

    def _reconnects(self) -> int:
        assert self._nc is not None
        return int(self._nc.stats["reconnects"])


def drops_from_the_front(stream: StreamInfo) -> bool:
    """Whether the stream discards messages by age, size or count (not only per subject)."""
    config = stream.config
    return (config.max_age or 0) > 0 or (config.max_bytes or -1) > 0 or (config.max_msgs or -1) > 0
