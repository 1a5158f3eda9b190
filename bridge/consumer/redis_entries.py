"""How a Redis watch handles stream entries: decoded into deliveries (or skipped, or queued as
the error to raise), acknowledged with ``XACK``, and, when nak'ed, due again after the delay.

:class:`RedisEntries` is the first part of :class:`~bridge.consumer.redis.RedisWatch` (the
behaviour is described there).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.exceptions

from bridge.aio import keep_cancellation
from bridge.consumer.base import Delivery
from bridge.consumer.decoding import Envelope, decode_redis_entry
from bridge.consumer.queueing import QueuedWatch
from bridge.consumer.redis_config import RedisWatchConfig
from bridge.errors import DecodeError
from bridge.subjects import redis_stream_key

__all__ = ["RETRYABLE", "EntryId", "RedisEntries", "parse_id", "text"]

log = logging.getLogger("bridge.consumer.redis")  # the watch's logger, for all its parts

RETRYABLE = (
    redis.exceptions.ConnectionError,  # also BusyLoadingError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    OSError,  # also TimeoutError
)
EntryId = tuple[int, int]


@dataclasses.dataclass(order=True)
class _Retry:
    due: float
    seq: int
    stream: str = dataclasses.field(compare=False)
    entry_id: str = dataclasses.field(compare=False)
    delivery: Delivery = dataclasses.field(compare=False)
    claim_idle_ms: int | None = dataclasses.field(compare=False)
    """None: yield ``delivery`` again; else ``XCLAIM`` the entry with this min-idle-time."""


class RedisEntries(QueuedWatch):
    """Entries of the watched streams: queued as deliveries, acknowledged (see the module
    docstring)."""

    def __init__(self, config: RedisWatchConfig, client: redis.asyncio.Redis) -> None:
        super().__init__()
        self.config = config
        self._client = client
        self.group = config.group
        self._sources = {redis_stream_key(s, config.stream_prefix): s for s in config.sources}
        self._cursor = dict.fromkeys(self._sources, "0-0")
        """Per stream: the last entry id read (or listed up to)."""
        self._retries: list[_Retry] = []
        self._seq = 0

    async def _accept(self, stream_key: Any, entries: Sequence[Any]) -> None:
        """Queue deliveries of ``entries`` (``(id, fields)`` pairs) of one stream, all before
        the first ``await`` (a cancelled read loses none), then acknowledge the skipped ones."""
        if not entries:
            return
        stream = text(stream_key)
        skipped: list[str] = []
        for raw_id, fields in entries:
            entry_id = text(raw_id)
            if not fields:  # a pending entry trimmed or deleted meanwhile: nothing to deliver
                log.warning("entry %s of %s was trimmed before being handled", entry_id, stream)
                skipped.append(entry_id)
                continue
            envelope = self._decode(stream, entry_id, fields)
            if envelope is not None:
                self._ready.append(self._delivery(stream, entry_id, envelope))
            elif self.config.on_decode_error == "skip":
                skipped.append(entry_id)
        last = max((text(entry[0]) for entry in entries), key=parse_id)
        if parse_id(last) > parse_id(self._cursor[stream]):
            self._cursor[stream] = last
        await self._ack(stream, *skipped)

    def _decode(self, stream: str, entry_id: str, fields: Any) -> Envelope | None:
        try:
            return decode_redis_entry(stream, fields, stream_prefix=self.config.stream_prefix)
        except DecodeError as exc:
            if self.config.on_decode_error == "raise":
                self._raise_later(exc, f"entry {entry_id} of {stream}")
            else:
                log.warning("skipping entry %s of %s: %s", entry_id, stream, exc)
            return None

    def _delivery(
        self, stream: str, entry_id: str, envelope: Envelope, *, initial: bool = False
    ) -> Delivery:
        durable = self.group is not None and not initial

        async def ack() -> None:
            if durable:
                await self._ack(stream, entry_id)

        async def nak(delay_s: float) -> None:
            self._seq += 1
            delay_s = max(0.0, delay_s)
            again = dataclasses.replace(delivery, initial=False) if initial else delivery
            # the entry has been idle since its delivery, so at least delay_s by then, unless
            # another consumer claimed it meanwhile (- 1: the server counts whole ms)
            idle_ms = max(0, int(delay_s * 1000) - 1) if durable else None
            due = asyncio.get_running_loop().time() + delay_s
            heapq.heappush(self._retries, _Retry(due, self._seq, stream, entry_id, again, idle_ms))

        delivery = Delivery(envelope, initial=initial, _ack=ack, _nak=nak)
        return delivery

    async def _ack(self, stream: str, *entry_ids: str) -> None:
        """``XACK``; a failure is logged, not raised: the entry stays pending (at least once)."""
        if self.group is None or self._closed or not entry_ids:  # closed: stays pending
            return
        try:
            try:
                await self._command("XACK", stream, self.group, *entry_ids)
            except RETRYABLE:  # a pooled connection may have died: once more, at once
                await self._command("XACK", stream, self.group, *entry_ids)
        except (redis.exceptions.RedisError, *RETRYABLE) as exc:
            log.warning(
                "could not acknowledge entries %s of %s (delivered again later): %s",
                ", ".join(entry_ids), stream, exc,
            )  # fmt: skip

    async def _command(self, *args: Any) -> Any:
        command = self._client.execute_command(*args)  # type: ignore[no-untyped-call]
        return await keep_cancellation(command)


def text(value: Any) -> str:
    """A value of a reply as text (redis-py gives bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_id(entry_id: str) -> EntryId:
    """An entry id as ``(ms, seq)``, to compare."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
