"""Sinks: where CloudEvents go. Each broker backend is a module with the same shape.

A sink's ``publish`` returns only once the broker acknowledged every event of the batch, or
raises :class:`~bridge.errors.PublishError`; the caller commits source state only after it
returned. Publishing the same event id twice must leave one message (broker-side dedup).

A sink whose broker refuses messages over a size (NATS ``max_payload``, a stream's
``max_msg_size``, the Redis sink's ``max_event_bytes``) is also a :class:`SizeLimitedSink`: the
delivery loop asks it which events of a batch are too large and leaves those out (each named,
counted and retried at a later poll) instead of letting one message fail the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from bridge.cloudevents import CloudEvent

__all__ = ["Sink", "SizeLimitedSink", "frame_bound"]


@runtime_checkable
class Sink(Protocol):
    """A broker the bridge publishes to."""

    @property
    def description(self) -> str:
        """Where events go, for logs, with no secret in it (``nats://host:4222 stream X``)."""
        ...

    async def connect(self) -> None:
        """Connect and create or verify the stream. Idempotent; raises PublishError."""
        ...

    async def publish(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        """Publish ``events`` (in order) and wait for every acknowledgement."""
        ...

    async def aclose(self) -> None:
        """Flush and disconnect."""
        ...


@runtime_checkable
class SizeLimitedSink(Protocol):
    """A sink that can tell, before publishing, which events its broker would refuse for
    their size."""

    async def oversized(self, source_name: str, events: Sequence[CloudEvent]) -> dict[int, str]:
        """The events over the broker's limit, by index, each with why (sizes and limit).
        Connects if needed (raises PublishError like :meth:`Sink.publish`)."""
        ...


def frame_bound(event: CloudEvent) -> int:
    """An upper bound of the bytes ``event`` takes in either content mode, headers included,
    computed without encoding it: the data, plus 12 bytes per character of every attribute (a
    character is at most 4 UTF-8 bytes, each percent-encoded as 3), plus 1 KiB for the names
    and framing. A sink measures exactly only the (rare) events this bound puts over its limit.
    """
    attrs = (
        len(event.id)
        + len(event.source)
        + len(event.type)
        + len(event.subject)
        + len(event.time)
        + len(event.dataschema)
        + len(event.datacontenttype)
        + len(event.traceparent or "")
        + len(event.version or "")  # koprs-version (its revision and kind fit in the 1 KiB)
    )
    return len(event.data_bytes()) + 12 * attrs + 1024
