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

and never before the list got to the last message of the watched subjects that the stream's
leader held when the watch began (``get_last_msg`` per filter subject): on a cluster the
consumer may live on a replica that lags behind the leader, whose "nothing pending" would end
the list without the latest changes (they would then come after :class:`Synced`); an item seen
a second time before that point comes as its later event, before :class:`Synced`.

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
watch is closed, ``ack()`` sends without waiting for the confirmation. An acknowledgement the
server confirmed but then lost (the consumer's leader died before storing it: a node killed, a
stream leader change) makes the server deliver the message again: the watch remembers the
last messages it settled, acknowledges such a message again and does not deliver it twice.

**Durable** (``durable="name"``): the consumer is named exactly so and survives restarts of
the watch and of the server. When it does not exist yet it is created, and the list is read
through it, so a crash during the list resumes within the list. When it exists, the watch
resumes from its acknowledgement floor (what was delivered but not acknowledged comes again) and
does **not** list again: :class:`Synced` comes at once, then the rest. A cache that lives in
memory wants the list on every start: give it no durable name (or a new one). Fan-out: every
durable name gets every event; watches sharing one name (other tasks, other processes) share its
messages, each message going to one of them. An existing consumer with other filter subjects is
a :class:`~bridge.errors.ConfigError` (delete it, or pick another name).
With ``list_on_resume=True`` an existing durable lists too: through a short-lived consumer
(``LAST_PER_SUBJECT``, no acknowledgements), after which the durable goes on after the list's
last message (what it holds up to there is acknowledged quietly, the list covers it); its
:class:`Synced` has ``listed=True``, a resume without a list ``listed=False``.

**Expired history**: when a durable's acknowledgement floor is before the stream's first
message at start, or a pull jumps past the watch's position to after the stream's first
message while running (messages expired or dropped by the stream's age, size or count limits
before they were read), the watch logs it and lists again (the durable goes on after the list,
as above); without ``list_first`` the loss is logged.

**Poison messages**: deliveries carry ``num_delivered`` (``attempt``), bounded by
``max_deliveries`` (see :func:`~bridge.consumer.run_handler`); a dead letter goes to the stream
``<stream>_DEADLETTER`` (:mod:`bridge.consumer.dead_letters`).

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

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from bridge.aio import Backoff
from bridge.connections import connect_nats, describe_error
from bridge.consumer.nats_config import ErrorPolicy, NatsWatchConfig
from bridge.consumer.nats_consumers import NatsConsumers, drops_from_the_front
from bridge.consumer.nats_messages import RETRYABLE, Session, Stopped, error_text
from bridge.errors import BridgeError
from bridge.secrets import redact_url
from bridge.sinks.nats_config import DEFAULT_STREAM
from bridge.subjects import DEFAULT_SUBJECT_PREFIX

__all__ = ["NatsWatch", "NatsWatchConfig", "watch_nats"]

log = logging.getLogger(__name__)

_FIRST_RETRY_S = 0.05
_NEEDS_AN_OPERATOR = ("authorization violation", "permissions violation", "TLS")


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


class NatsWatch(NatsConsumers):
    """An async iterator of :data:`WatchItem` over a JetStream stream; see the module docstring.

    Use as an async context manager, or call :meth:`aclose` when done.
    """

    messaging_system = "nats"
    """For the spans of :func:`bridge.consumer.run_handler`."""

    def __init__(self, url_or_client: str | Client, config: NatsWatchConfig | None = None) -> None:
        if isinstance(url_or_client, str):
            super().__init__(config or NatsWatchConfig(), None, redact_url(url_or_client))
            self._url = url_or_client
            self._owns_client = True
        else:
            super().__init__(config or NatsWatchConfig(), url_or_client, "NATS")
            self._url, self._owns_client = "", False
        self._session: Session | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return self.config.sources

    @property
    def durable_name(self) -> str | None:
        """The durable consumer's name (None: ephemeral), e.g. for metrics labels."""
        return self.config.durable

    @property
    def consumer_name(self) -> str | None:
        """The name of the consumer in use (the durable name, or the server's ephemeral name)."""
        return self._session.consumer if self._session is not None else self.config.durable

    def __repr__(self) -> str:
        return f"<NatsWatch {self._where} {self.config.stream} consumer {self.consumer_name}>"

    async def _fill(self) -> None:
        backoff = Backoff(_FIRST_RETRY_S, max(self.config.retry_max_s, _FIRST_RETRY_S))
        while not self._ready:
            if self._closed:
                await self._drop_session()  # one a step made after aclose()
                return
            try:
                await self._step()
                backoff.reset()
            except Stopped:
                continue
            except RETRYABLE as exc:
                if self._closed:
                    continue
                if self._nc is not None and self._nc.is_closed and not self._owns_client:
                    raise BridgeError(
                        f"nats watch: the client passed to it was closed ({error_text(exc)})"
                    ) from exc
                delay = backoff.next()
                self._log_retry(exc, delay)
                await self._sleep(delay)

    async def _release(self) -> None:
        """Wake an iteration waiting in another task; delete the ephemeral consumer; close the
        client the watch made."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
        await self._drop_session()
        if self._owns_client and self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(*RETRYABLE):
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
        if session.then_bind is not None and not session.listing:
            self._session = await self._continue_durable(session)
            return
        msgs = await self._fetch(session)
        if self._reconnects() != session.reconnects:
            if session.then_bind is not None:
                log.info(
                    "NATS %s reconnected during the list: listing again", self._where
                )  # fmt: skip
                await self._drop(session)
                self._session = await self._open(None)
                return
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
        if msgs and await self._lost_before(session, msgs):
            return
        if msgs:
            for msg in msgs:
                await self._accept(session, msg)
            return
        info = await self._consumer_info(session.consumer)
        if info is None and session.then_bind is not None:
            log.warning("the list's consumer %s is gone: listing again", session.consumer)
            self._session = await self._open(None)
        elif info is None:
            log.warning(
                "consumer %s of stream %s on %s is gone: creating it again",
                session.consumer, self.config.stream, self._where,
            )  # fmt: skip
            self._session = await self._open(session)
        elif session.listing and info.num_pending == 0:
            if not self._listed_through(session):
                # a consumer on a replica behind the stream's leader, or the list's last
                # message deleted since: look again where the list ends
                session.through = await self._last_watched()
            if self._listed_through(session):
                self._end_listing(session)

    async def _lost_before(self, session: Session, msgs: list[Msg]) -> bool:
        """Whether messages between the watch's position and ``msgs`` expired or were trimmed
        (a sequence gap reaching before the stream's first message): then list again, the
        messages not accepted (True). Without ``list_first`` the loss is logged (False)."""
        first_seq = msgs[0].metadata.sequence.stream
        if session.listing or session.position is None or first_seq <= session.position + 1:
            return False
        stream = await self._stream_info()
        start = stream.state.first_seq
        if start <= session.position + 1 or not drops_from_the_front(stream):
            return False  # the sequences in between are other subjects' (or kept)
        cfg = self.config
        log.warning(
            "messages of stream %s after sequence %d expired or were trimmed before the watch "
            "read them (the stream starts at %d now): %s",
            cfg.stream, session.position, start,
            "listing again" if cfg.list_first else "going on, they are lost",
        )  # fmt: skip
        if not cfg.list_first:
            return False
        if cfg.durable is None:
            self._session = await self._open(session)  # its resume plan lists again
            return True
        for msg in msgs:  # they come again, after the list (covered by it, or later)
            with contextlib.suppress(*RETRYABLE):
                await msg.nak()
        await self._drop(session)
        self._session = await self._prelist(stream, "messages were lost")
        return True

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

    # -- logs --

    def _log_retry(self, exc: BaseException, delay: float) -> None:
        if isinstance(exc, nats.js.errors.NotFoundError) and self._waiting_for_stream:
            log.debug("stream %s still missing; next look in %.2f s", self.config.stream, delay)
            return
        reason = error_text(exc)
        if isinstance(exc, TimeoutError) and self._server_error is not None:
            reason = f"{reason}; the server reported: {self._server_error}"
        self._server_error = None
        log.warning("NATS watch on %s: %s; trying again in %.2f s", self._where, reason, delay)
