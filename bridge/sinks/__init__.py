"""Sinks: where CloudEvents go. Each broker backend is a module with the same shape.

A sink's ``publish`` returns only once the broker acknowledged every event of the batch, or
raises :class:`~bridge.errors.PublishError`; the caller commits source state only after it
returned. Publishing the same event id twice must leave one message (broker-side dedup).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from bridge.cloudevents import CloudEvent

__all__ = ["Sink"]


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
