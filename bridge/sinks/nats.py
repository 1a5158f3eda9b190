"""``NatsSink``: publish CloudEvents to a NATS JetStream stream.

Every item has its own subject, ``<subject_prefix>.<source-name>.<item-token>`` (see
:mod:`bridge.subjects`), so a consumer with ``DeliverPolicy.LAST_PER_SUBJECT`` reads the current
state of every item. ``Nats-Msg-Id`` is the CloudEvent id: JetStream drops a copy published
again within ``duplicate_window_s`` and acknowledges it with ``duplicate: true``, which counts as
success. Content modes:

* ``binary`` (default): ``ce-*`` headers and ``content-type: application/json``, the data as
  body (CloudEvents NATS binding, binary mode). Header values are percent-encoded as the
  CloudEvents HTTP binding prescribes (:meth:`bridge.cloudevents.CloudEvent.to_binary`), so
  blanks, line breaks and non-ASCII text in a key survive the NATS client (which would strip or
  fold them); decode them with :func:`bridge.cloudevents.header_value`.
* ``structured``: the whole event as JSON, ``content-type: application/cloudevents+json``.

In both modes the ``koprs-kind``, ``koprs-version`` and ``koprs-revision`` headers
(:func:`bridge.cloudevents.state_headers`) let :mod:`bridge.sinks.nats_recovery` rebuild a
source's state from a headers-only ``LAST_PER_SUBJECT`` read.

A message (headers and body) larger than the server's ``max_payload`` (1 MiB by default) or
the stream's ``max_msg_size`` would make the server close the connection, or refuse it: such
events are found by :meth:`NatsSink.oversized` before publishing, and the delivery loop leaves
them out of the batch (:class:`~bridge.sinks.SizeLimitedSink`).

A batch is pipelined: every message is sent (up to 4096 in flight) before any acknowledgement
is awaited, then all acknowledgements are awaited together, at most ``ack_timeout_s`` after the
last one was sent. Acknowledgements come to one inbox subscription of the sink and are counted
per batch. When the client reconnects while a batch waits, its unacknowledged messages are sent
again (at most twice): those written to the dead connection were lost. A missing or negative
acknowledgement fails the whole batch with :class:`PublishError`; the caller publishes the batch
again and the messages that did land are dropped as duplicates.

The stream is created when missing (file storage, limits retention, discard old). An existing
stream is checked: when its subjects do not cover ``<subject_prefix>.>`` the subject filter is
added, and differing limits are updated to the configured ones. What the server refuses
(changing replicas on a single server, a subject owned by another stream, a mirror...) is a
:class:`PublishError` that says what to change.

Options, the stream's definition and retention: :mod:`bridge.sinks.nats_config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import ssl
from collections.abc import Sequence

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bridge.cloudevents import CloudEvent, state_headers
from bridge.connections import ConnectError, connect_nats, describe_error
from bridge.errors import PublishError
from bridge.secrets import redact_url
from bridge.sinks import frame_bound
from bridge.sinks.nats_config import (
    DEFAULT_STREAM,
    ContentMode,
    NatsSinkConfig,
    stream_changes,
    subject_filter_covers,
)
from bridge.state.recovery import Published
from bridge.subjects import nats_subject, validate_source_name

__all__ = [
    "DEFAULT_STREAM",
    "MSG_ID_HEADER",
    "STRUCTURED_CONTENT_TYPE",
    "ContentMode",
    "NatsSink",
    "NatsSinkConfig",
    "subject_filter_covers",
]

log = logging.getLogger(__name__)

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
MSG_ID_HEADER = "Nats-Msg-Id"
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)
_WINDOW = 4096
"""Most messages one publish() has in flight; a larger batch waits for acks in between."""
_MAX_RESENDS = 2
_NO_STREAM = "no stream captures the subject (no responders)"
_MSG_TOO_LARGE = "(code 10054)"
"""JetStream's error code for a message over the stream's ``max_msg_size``."""
_HEADER_FRAME = len(b"NATS/1.0\r\n") + len(b"\r\n")


class _Batch:
    """Acknowledgements of one window of a publish: a count, not a future per message."""

    __slots__ = (
        "acked",
        "errors",
        "first_error",
        "first_failed",
        "reconnected",
        "remaining",
        "wake",
    )

    def __init__(self, size: int) -> None:
        self.acked = bytearray(size)
        self.remaining = size
        self.errors = 0
        self.first_error: str | None = None
        self.first_failed = -1
        """The index of the message the first error is about."""
        self.reconnected = False
        self.wake = asyncio.Event()
        """Set when the last acknowledgement came, or when the client reconnected."""

    def settle(self, index: int, error: str | None) -> None:
        if index >= len(self.acked) or self.acked[index]:
            return  # not ours, or a second reply to the same message
        self.acked[index] = 1
        if error is not None:
            self.errors += 1
            if self.first_error is None:
                self.first_error, self.first_failed = error, index
        self.remaining -= 1
        if not self.remaining:
            self.wake.set()

    def on_reconnect(self) -> None:
        self.reconnected = True
        self.wake.set()


class NatsSink:
    """Publishes to JetStream; see the module docstring. ``publish()`` connects if needed.

    Acknowledgements come to one inbox subscription of the sink (``<inbox>.<batch>.<index>``)
    and are recorded per message of the batch. That is what lets a batch survive a reconnect:
    the sink knows which messages are still unacknowledged and sends exactly those again, in
    order, on the new connection (see the module docstring). It is not there for speed: against
    nats-py's ``publish_async`` of the same messages, encoded beforehand, throughput is
    0.91-1.01x (bench/RESULTS.md, the JetStream ``publish`` rows, sink only).
    """

    def __init__(self, config: NatsSinkConfig | None = None) -> None:
        self.config = config or NatsSinkConfig()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._batches: dict[str, _Batch] = {}
        self._batch_numbers = itertools.count()
        self._connected = asyncio.Event()
        self._stream_ready = False
        self._stream_max_msg_size: int | None = None
        """The stream's ``max_msg_size`` (None: unlimited), read when the stream is checked."""
        self._lock = asyncio.Lock()
        self._server_error: str | None = None
        """The last error the server reported asynchronously (a permissions violation...)."""
        self._logged_error: str | None = None
        self._limits_warned = False
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
        holder: list[Client] = []

        async def on_disconnected() -> None:
            self._connected.clear()
            if holder and holder[0] is self._nc:  # not while closing
                log.warning("disconnected from NATS %s; reconnecting", self.description)

        async def on_reconnected() -> None:
            self._connected.set()
            self._logged_error = None
            for batch in self._batches.values():
                batch.on_reconnect()
            log.info("reconnected to NATS %s", self.description)

        async def on_error(exc: Exception) -> None:
            text = describe_error(exc)
            self._server_error = text
            if text != self._logged_error and _worth_a_warning(exc, text):
                # once per distinct cause: a reconnection failing every second logs once
                self._logged_error = text
                log.warning("NATS %s: %s", self.description, text)
            else:
                log.debug("NATS %s: %s", self.description, text)

        try:
            nc = await connect_nats(
                cfg.url,
                cfg.tls,
                cfg.auth,
                name="koprs-bridge",
                connect_timeout_s=cfg.connect_timeout_s,
                reconnect_wait_s=cfg.reconnect_wait_s,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                # subjects are built from validated parts (bridge.subjects)
                skip_subject_validation=True,
            )
        except ConnectError as exc:
            raise PublishError(
                f"cannot connect to NATS {self.description}: {describe_error(exc.__cause__)}"
            ) from exc.__cause__
        holder.append(nc)
        try:
            inbox = nc.new_inbox()
            await nc.subscribe(f"{inbox}.>", cb=self._on_ack)
        except (*_NATS_ERRORS, ValueError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            raise PublishError(
                f"cannot connect to NATS {self.description}: {_describe(exc)}"
            ) from exc
        self._nc, self._inbox = nc, inbox
        self._js = nc.jetstream(timeout=cfg.connect_timeout_s)
        self._connected.set()
        self._stream_ready = False

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        cfg = self.config
        self._server_error = None
        try:
            try:
                info = await self._js.stream_info(cfg.stream)
            except nats.js.errors.NotFoundError:
                created = await self._js.add_stream(cfg.stream_config())
                log.info("created stream %s on %s", cfg.stream, self.description)
                self._stream_max_msg_size = _positive(created.config.max_msg_size)
                self._stream_ready = True
                return
            current = info.config
            self._stream_max_msg_size = _positive(current.max_msg_size)
            changes = stream_changes(current, cfg)
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
                f"NATS {self.description}: stream check failed: "
                f"{self._with_server_error(_describe(exc))}"
            ) from exc
        self._stream_ready = True

    def _with_server_error(self, text: str) -> str:
        """``text``, plus what the server reported meanwhile (a permissions violation makes
        the server drop a request silently: the client only sees a timeout)."""
        if self._server_error is None:
            return text
        return f"{text}; the server reported: {self._server_error}"

    async def _ready(self) -> Client:
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
        assert self._nc is not None
        return self._nc

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        if not events:
            return
        validate_source_name(source_name)
        nc = await self._ready()
        self._server_error = None
        total = len(events)
        for start in range(0, total, _WINDOW):
            window = events[start : start + _WINDOW]
            unsent = total - start - len(window)
            batch_id = str(next(self._batch_numbers))
            batch = self._batches[batch_id] = _Batch(len(window))
            try:
                await self._send(nc, source_name, window, f"{self._inbox}.{batch_id}.")
                await self._wait(nc, batch, source_name, window, f"{self._inbox}.{batch_id}.")
            except _NATS_ERRORS as exc:
                timed_out = isinstance(exc, asyncio.TimeoutError)
                failed = batch.remaining + batch.errors if timed_out else len(window)
                reason = self._with_server_error(
                    f"no acknowledgement within {self.config.ack_timeout_s} s"
                    if timed_out
                    else f"sending failed: {_describe(exc)}"
                )
                raise PublishError(
                    f"NATS {self.description}: {failed + unsent} of {total} events of "
                    f"{source_name!r} not acknowledged ({reason})"
                ) from exc
            finally:
                del self._batches[batch_id]
            if batch.errors:
                if batch.first_error == _NO_STREAM or _MSG_TOO_LARGE in (batch.first_error or ""):
                    # deleted meanwhile (recreate it), or its max_msg_size changed (read it):
                    # check the stream again next time
                    self._stream_ready = False
                raise PublishError(
                    f"NATS {self.description}: {batch.errors + unsent} of {total} events of "
                    f"{source_name!r} not acknowledged (first error, for item "
                    f"{window[batch.first_failed].subject!r}: {batch.first_error})"
                )

    async def oversized(self, source_name: str, events: Sequence[CloudEvent]) -> dict[int, str]:
        """Events whose message (headers and body) is over the server's ``max_payload`` or the
        stream's ``max_msg_size``; see :class:`~bridge.sinks.SizeLimitedSink`."""
        if not events:
            return {}
        nc = await self._ready()
        limit, what = nc.max_payload, "the server's max_payload"
        stream_limit = self._stream_max_msg_size
        if stream_limit is not None and stream_limit < limit:
            limit, what = stream_limit, f"the max_msg_size of stream {self.config.stream}"
        found: dict[int, str] = {}
        encode = self._encode
        for index, event in enumerate(events):
            if frame_bound(event) <= limit:
                continue
            headers, body = encode(event)
            size = len(body) + _HEADER_FRAME
            size += sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
            if size > limit:
                found[index] = f"a message of {size} bytes, over {what} ({limit} bytes)"
        return found

    async def _send(
        self,
        nc: Client,
        source_name: str,
        events: Sequence[CloudEvent],
        reply_prefix: str,
        skip: bytearray | None = None,
    ) -> None:
        """Send without waiting: the client buffers the messages and writes them in bulk.

        With ``skip``, messages whose index is marked there (acknowledged) are left out.
        """
        subject_prefix = self.config.subject_prefix
        encode = self._encode
        publish = nc.publish
        for index, event in enumerate(events):
            if skip is not None and skip[index]:
                continue
            headers, body = encode(event)
            await publish(
                nats_subject(source_name, event.subject, subject_prefix),
                body,
                reply=f"{reply_prefix}{index}",
                headers=headers,
            )

    async def _wait(
        self,
        nc: Client,
        batch: _Batch,
        source_name: str,
        events: Sequence[CloudEvent],
        reply_prefix: str,
    ) -> None:
        """Wait for every acknowledgement; raise TimeoutError after ``ack_timeout_s``.

        Messages written just before a connection loss was noticed are gone with the old
        connection: when the client reconnects meanwhile, what is still unacknowledged is sent
        again (a copy that did land is dropped by its ``Nats-Msg-Id``). What was lost is a tail
        of what was sent, so resending in order keeps each item's events in order.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ack_timeout_s
        resends = 0
        while batch.remaining:
            batch.wake.clear()
            async with asyncio.timeout_at(deadline):
                await batch.wake.wait()
            if batch.reconnected and batch.remaining and resends < _MAX_RESENDS:
                deadline = loop.time() + self.config.ack_timeout_s
                batch.reconnected = False
                resends += 1
                log.info(
                    "NATS %s: resending %d unacknowledged events of %r after reconnecting",
                    self.description,
                    batch.remaining,
                    source_name,
                )
                await self._send(nc, source_name, events, reply_prefix, skip=batch.acked)

    async def _on_ack(self, msg: Msg) -> None:
        _, batch_id, index = msg.subject.rsplit(".", 2)
        batch = self._batches.get(batch_id)
        if batch is None:
            return  # a late reply to a batch that already failed
        data = msg.data
        if data[:1] == b"{" and b'"error"' not in data:
            batch.settle(int(index), None)
        else:
            batch.settle(int(index), _ack_error(msg))

    async def read_published(self, source_name: str) -> Published:
        """What the stream holds of ``source_name`` (:mod:`bridge.sinks.nats_recovery`)."""
        from bridge.sinks.nats_recovery import read_published

        validate_source_name(source_name)
        nc = await self._ready()
        assert self._js is not None
        cfg = self.config
        try:
            published = await read_published(
                nc,
                self._js,
                cfg.stream,
                cfg.subject_prefix,
                source_name,
                timeout_s=max(10.0, cfg.ack_timeout_s),
            )
        except (*_NATS_ERRORS, nats.js.errors.Error) as exc:
            raise PublishError(
                f"NATS {self.description}: cannot read what the stream holds of "
                f"{source_name!r}: {self._with_server_error(_describe(exc))}"
            ) from exc
        if self._limits_warned:  # the stream's limits: said once, not once per source
            published.warnings = []
        self._limits_warned = True
        return published

    async def aclose(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._connected.clear()
        self._stream_ready = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*_NATS_ERRORS):
                await asyncio.wait_for(nc.close(), self.config.connect_timeout_s)

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """Whether the server answers now (a PING round trip), for readiness; never raises."""
        nc = self._nc
        if nc is None or not nc.is_connected or not self._connected.is_set():
            return False
        try:
            await asyncio.wait_for(nc.flush(timeout=math.ceil(timeout_s)), timeout_s)
        except (*_NATS_ERRORS, ValueError):
            return False
        return True


def _positive(limit: int | None) -> int | None:
    """A JetStream size limit, None for unlimited (``-1`` or 0)."""
    return limit if limit is not None and limit > 0 else None


def _ack_error(msg: Msg) -> str | None:
    """The error a JetStream reply reports, or None for a positive acknowledgement."""
    if msg.headers and msg.headers.get("Status") == "503":
        return _NO_STREAM
    try:
        reply = json.loads(msg.data)
    except ValueError:
        return f"unreadable reply {msg.data[:80]!r}"
    if not isinstance(reply, dict):
        return f"unexpected reply {msg.data[:80]!r}"
    error = reply.get("error")
    if error is None:
        return None if "seq" in reply else f"unexpected reply {msg.data[:80]!r}"
    if isinstance(error, dict):
        return f"{error.get('description', error)} (code {error.get('err_code', '?')})"
    return str(error)


def _encode_binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    headers, body = event.to_binary()
    headers[MSG_ID_HEADER] = event.id
    headers.update(state_headers(event))
    return headers, body


def _encode_structured(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    headers = {MSG_ID_HEADER: event.id, "content-type": STRUCTURED_CONTENT_TYPE}
    headers.update(state_headers(event))
    return headers, event.to_structured()


def _worth_a_warning(exc: BaseException, text: str) -> bool:
    """Errors that need an operator (credentials, permissions, TLS), not just patience."""
    return isinstance(exc, nats.errors.AuthorizationError | ssl.SSLError) or text.startswith(
        ("authorization violation", "permissions violation", "TLS", "the server does not offer")
    )


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{exc.description} (code {exc.err_code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
