"""FastStream integration: subscribe with FastStream, receive the typed events.

Operators that already run on `FastStream <https://faststream.ag2.ai>`_ pass one of these
decoders to their subscriber; the handler then gets an :class:`~bridge.consumer.Envelope` (the
typed ``Added``/``Modified``/``Removed`` plus its CloudEvent context) instead of bytes, in
either content mode, validated against the JSON Schemas in ``schemas/``. Install with
``pip install 'koprs-bridge[faststream]'``.

NATS JetStream (the bridge owns the stream: ``declare=False`` keeps FastStream from changing
it)::

    from faststream import FastStream
    from faststream.nats import JStream, NatsBroker

    from bridge import Added, Modified, Removed
    from bridge.consumer import Envelope
    from bridge.consumer.faststream import koprs_nats_decoder

    broker = NatsBroker("nats://127.0.0.1:4222")

    @broker.subscriber(
        "koprs.external.app-config.>",               # one source; "koprs.external.>" for all
        stream=JStream("KOPRS_EXTERNAL", declare=False),
        durable="my-operator",                       # resume where it stopped after a restart
        pull_sub=True,                               # (FastStream's advice for durables)
        decoder=koprs_nats_decoder,
    )
    async def on_change(envelope: Envelope) -> None:
        match envelope.event:
            case Added(resource) | Modified(resource): ...
            case Removed(resource): ...

    app = FastStream(broker)

Redis Streams (one stream per source; a consumer group acknowledges what it handled)::

    from faststream.redis import RedisBroker, StreamSub
    from bridge.consumer.faststream import koprs_redis_decoder

    broker = RedisBroker("redis://127.0.0.1:6379/0")

    @broker.subscriber(
        stream=StreamSub("koprs:external:app-config", group="my-operator", consumer="pod-1"),
        decoder=koprs_redis_decoder,
    )
    async def on_change(envelope: Envelope) -> None: ...

Variants: :data:`koprs_nats_event_decoder` / :data:`koprs_redis_event_decoder` hand the handler
the bare event (``async def on_change(event: ExternalEvent[Any])``); :func:`nats_decoder` /
:func:`redis_decoder` build decoders for a non-default subject or stream prefix
(``broker.subject_prefix`` in the bridge's config) or other policies. A batch subscriber
(``pull_sub=PullSub(batch=True)``, ``StreamSub(..., batch=True)``) gets a list.

Policies:

* A well-formed event of a type or version this version does not know (a ``v2`` published
  beside ``v1`` during a migration) is acknowledged and skipped: the handler never sees it
  (``skip_unknown=False`` raises :class:`~bridge.consumer.UnknownEventTypeError` instead).
* A message that is not a koprs CloudEvent raises :class:`~bridge.errors.DecodeError`; what
  happens to it is FastStream's ``ack_policy`` (its default rejects it, so it is not redelivered
  forever). Pass ``ack_policy=AckPolicy.NACK_ON_ERROR`` to have failed *handlers* retried.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypeAlias

from bridge.errors import MissingExtraError

try:
    from faststream.exceptions import AckMessage
    from faststream.message import StreamMessage
except ModuleNotFoundError as exc:  # the `faststream` extra is not installed
    raise MissingExtraError("bridge.consumer.faststream", "faststream", exc.name or "?") from exc

from bridge.consumer.decoding import (
    Envelope,
    UnknownEventTypeError,
    decode_nats,
    decode_redis_entry,
)
from bridge.events import ExternalEvent
from bridge.subjects import DEFAULT_SUBJECT_PREFIX, REDIS_STREAM_PREFIX

__all__ = [
    "Decoder",
    "koprs_nats_decoder",
    "koprs_nats_event_decoder",
    "koprs_redis_decoder",
    "koprs_redis_event_decoder",
    "nats_decoder",
    "redis_decoder",
]

Decoder: TypeAlias = Callable[[StreamMessage[Any]], Awaitable[Any]]
"""What ``decoder=`` of a FastStream subscriber accepts (one argument: the message)."""

Yield = Literal["envelope", "event"]


def _pick(envelope: Envelope, what: Yield) -> Envelope | ExternalEvent[Any]:
    return envelope if what == "envelope" else envelope.event


def nats_decoder(
    *,
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
    yields: Yield = "envelope",
    skip_unknown: bool = True,
) -> Decoder:
    """A decoder for a FastStream NATS (JetStream) subscriber.

    ``subject_prefix`` is the bridge's ``broker.subject_prefix`` (it names the source in
    :attr:`Envelope.source_name`); ``yields`` is ``"envelope"`` or ``"event"``.
    """

    async def decode(msg: StreamMessage[Any]) -> Any:
        raw = msg.raw_message
        if isinstance(raw, list):  # a batch subscriber
            return _batch(
                lambda one: decode_nats(
                    one.subject,
                    _text_headers(one.headers or {}),
                    one.data,
                    subject_prefix=subject_prefix,
                ),
                raw,
                yields,
                skip_unknown,
            )
        subject = getattr(raw, "subject", "")
        return _single(
            lambda: decode_nats(
                subject, _text_headers(msg.headers), msg.body, subject_prefix=subject_prefix
            ),
            yields,
            skip_unknown,
        )

    decode.__name__ = decode.__qualname__ = "koprs_nats_decoder"
    return decode


def redis_decoder(
    *,
    stream_prefix: str = REDIS_STREAM_PREFIX,
    yields: Yield = "envelope",
    skip_unknown: bool = True,
) -> Decoder:
    """A decoder for a FastStream Redis stream subscriber (``stream=StreamSub(...)``).

    It reads the entry's fields as the bridge wrote them (``ce-*`` + ``data``, or ``event``),
    not FastStream's own message format. A batch subscriber gets a list, without the skipped
    unknown events.
    """

    async def decode(msg: StreamMessage[Any]) -> Any:
        raw = msg.raw_message
        if not isinstance(raw, Mapping) or raw.get("type") not in ("stream", "bstream"):
            kind = raw.get("type") if isinstance(raw, Mapping) else type(raw).__name__
            raise TypeError(
                f"koprs_redis_decoder reads Redis stream entries (stream=StreamSub(...)), "
                f"not {kind!r} messages"
            )
        stream = raw["channel"]
        if raw["type"] == "bstream":
            return _batch(
                lambda fields: decode_redis_entry(stream, fields, stream_prefix=stream_prefix),
                raw["data"],
                yields,
                skip_unknown,
            )
        return _single(
            lambda: decode_redis_entry(stream, raw["data"], stream_prefix=stream_prefix),
            yields,
            skip_unknown,
        )

    decode.__name__ = decode.__qualname__ = "koprs_redis_decoder"
    return decode


def _batch(
    decode: Callable[[Any], Envelope], messages: Iterable[Any], yields: Yield, skip_unknown: bool
) -> list[Any]:
    """A batch subscriber's list: every message decoded, unknown events left out (or raised,
    without ``skip_unknown``)."""
    out: list[Any] = []
    for message in messages:
        try:
            envelope = decode(message)
        except UnknownEventTypeError:
            if not skip_unknown:
                raise
            continue
        out.append(_pick(envelope, yields))
    return out


def _single(decode: Callable[[], Envelope], yields: Yield, skip_unknown: bool) -> Any:
    """One message decoded; an unknown event is acknowledged and skipped (``AckMessage``), or
    raised without ``skip_unknown``."""
    try:
        envelope = decode()
    except UnknownEventTypeError as exc:
        if skip_unknown:
            raise AckMessage() from exc
        raise
    return _pick(envelope, yields)


def _text_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else str(v) for k, v in headers.items()}


koprs_nats_decoder: Decoder = nats_decoder()
"""Subscriber ``decoder=`` for the default subject prefix: the handler gets an Envelope."""
koprs_nats_event_decoder: Decoder = nats_decoder(yields="event")
"""Subscriber ``decoder=``: the handler gets the ``Added``/``Modified``/``Removed``."""
koprs_redis_decoder: Decoder = redis_decoder()
"""Subscriber ``decoder=`` for ``koprs:external:<source>`` streams: the handler gets an
Envelope."""
koprs_redis_event_decoder: Decoder = redis_decoder(yields="event")
"""Subscriber ``decoder=``: the handler gets the ``Added``/``Modified``/``Removed``."""
