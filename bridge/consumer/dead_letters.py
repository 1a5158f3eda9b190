"""Where a watch puts the events a handler gave up on (poison events), and how they read back.

A dead letter is the original message, unchanged (headers / fields and data, so it still decodes
as the CloudEvent it was), plus what went wrong, under names that start with
``koprs-dead-letter-``:

=================================  ==========================================================
``koprs-dead-letter-error``        the handler's error (one line, at most 1000 characters)
``koprs-dead-letter-deliveries``   how many times it had been delivered
``koprs-dead-letter-consumer``     the durable consumer / group (and consumer) that gave up
``koprs-dead-letter-origin``       NATS: ``<stream>:<sequence>``; Redis: ``<stream>:<id>``
``koprs-dead-letter-time``         when (RFC 3339, UTC)
=================================  ==========================================================

Destinations, beside the bridge's own names and never inside them:

* **NATS**: subject ``<dead-letter prefix>.<source>.<item token>``, the prefix being the
  subject prefix with its last token replaced by ``deadletter`` (``koprs.external`` ->
  ``koprs.deadletter``), in a JetStream stream of its own, ``<stream>_DEADLETTER``
  (``KOPRS_EXTERNAL_DEADLETTER``), which the watch creates when missing (file storage,
  subjects ``<dead-letter prefix>.>``, at most :data:`DEAD_LETTER_MAX_MSGS` messages, oldest
  dropped first). A plain subject would lose them when nobody listens; the bridge's stream
  captures only ``<subject prefix>.>``. Messages carry ``Nats-Msg-Id``
  ``<origin>:<consumer>``, so one written twice (an acknowledgement lost) is stored once.
* **Redis**: stream ``koprs:deadletter:<source>`` (the stream prefix with a trailing
  ``external:`` replaced by ``deadletter:``, else ``deadletter:`` appended), ``XADD MAXLEN ~``
  :data:`DEAD_LETTER_MAX_MSGS`.

``koprs-bridge tail --dead-letters`` follows them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from bridge.consumer.decoding import Envelope, decode_nats, decode_redis_entry
from bridge.errors import DecodeError

__all__ = [
    "DEAD_LETTER_MAX_MSGS",
    "HEADER_PREFIX",
    "DeadLetter",
    "dead_letter_fields",
    "nats_dead_letter_prefix",
    "nats_dead_letter_stream",
    "read_nats_dead_letter",
    "read_redis_dead_letter",
    "redis_dead_letter_prefix",
]

DEAD_LETTER_MAX_MSGS = 100_000
"""The most dead letters kept per NATS stream / Redis stream (oldest dropped first)."""
HEADER_PREFIX = "koprs-dead-letter-"
_MAX_ERROR = 1000


def nats_dead_letter_prefix(subject_prefix: str) -> str:
    """``koprs.external`` -> ``koprs.deadletter``."""
    head, _, _last = subject_prefix.rpartition(".")
    return f"{head}.deadletter" if head else "deadletter"


def nats_dead_letter_stream(stream: str) -> str:
    """``KOPRS_EXTERNAL`` -> ``KOPRS_EXTERNAL_DEADLETTER``."""
    return f"{stream}_DEADLETTER"


def redis_dead_letter_prefix(stream_prefix: str) -> str:
    """``koprs:external:`` -> ``koprs:deadletter:``."""
    if stream_prefix.endswith("external:"):
        return stream_prefix[: -len("external:")] + "deadletter:"
    return f"{stream_prefix}deadletter:"


def dead_letter_fields(error: str, deliveries: int, consumer: str, origin: str) -> dict[str, str]:
    """The ``koprs-dead-letter-*`` headers / fields of one dead letter."""
    line = " ".join(error.split())
    if len(line) > _MAX_ERROR:
        line = line[: _MAX_ERROR - 3] + "..."
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return {
        f"{HEADER_PREFIX}error": line or "(no message)",
        f"{HEADER_PREFIX}deliveries": str(deliveries),
        f"{HEADER_PREFIX}consumer": consumer,
        f"{HEADER_PREFIX}origin": origin,
        f"{HEADER_PREFIX}time": now,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter read back: the event (None when it does not decode) and why."""

    envelope: Envelope | None
    error: str
    deliveries: int
    consumer: str
    origin: str
    time: str
    position: str
    """Where it is in the dead-letter stream (NATS sequence, Redis entry id)."""


def _dead_letter(info: Mapping[str, Any], envelope: Envelope | None, position: str) -> DeadLetter:
    def get(name: str) -> str:
        value = info.get(HEADER_PREFIX + name, "")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    deliveries = get("deliveries")
    return DeadLetter(
        envelope=envelope,
        error=get("error"),
        deliveries=int(deliveries) if deliveries.isdigit() else 0,
        consumer=get("consumer"),
        origin=get("origin"),
        time=get("time"),
        position=position,
    )


def read_nats_dead_letter(
    subject: str, headers: Mapping[str, str] | None, data: bytes, *, prefix: str, position: str
) -> DeadLetter:
    """A message of the NATS dead-letter stream (``prefix``: the dead-letter subject prefix)."""
    try:
        envelope: Envelope | None = decode_nats(subject, headers, data, subject_prefix=prefix)
    except DecodeError:
        envelope = None
    return _dead_letter(headers or {}, envelope, position)


def read_redis_dead_letter(
    stream: str, fields: Mapping[Any, Any], *, prefix: str, position: str
) -> DeadLetter:
    """An entry of a Redis dead-letter stream (``prefix``: the dead-letter stream prefix)."""
    text = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
    try:
        envelope: Envelope | None = decode_redis_entry(stream, text, stream_prefix=prefix)
    except DecodeError:
        envelope = None
    return _dead_letter(text, envelope, position)
