"""How a Redis watch handles stream entries: decoded into deliveries (or skipped, or queued as
the error to raise), acknowledged with ``XACK``, and, when nak'ed, due again after the delay.

:class:`RedisEntries` is the first part of :class:`~bridge.consumer.redis.RedisWatch` (the
behaviour is described there).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import redis.asyncio
import redis.exceptions

from bridge.aio import keep_cancellation
from bridge.consumer.base import Delivery
from bridge.consumer.dead_letters import DEAD_LETTER_MAX_MSGS, dead_letter_fields
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
        self.consumer = config.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._sources = {redis_stream_key(s, config.stream_prefix): s for s in config.sources}
        self._cursor = dict.fromkeys(self._sources, "0-0")
        """Per stream: the last entry id read (or listed up to)."""
        self._retries: list[_Retry] = []
        self._seq = 0
        self._listed_upto: dict[str, str] = {}
        """Per stream resumed with a list: the group's entries up to this id are covered by
        the list (acknowledged quietly, not delivered)."""
        self._entries_read: dict[str, int] = {}
        """Per stream: how many entries of the stream this watch has read (without a group),
        or had been when it last listed (with one): more trimmed from the front than this
        means entries it never read are gone."""
        self._pending_trimmed: set[str] = set()
        """Streams where a delivered, unacknowledged entry was found trimmed."""
        self._lag: dict[str, int | None] = {}
        """Per stream: the group's lag at the last check."""
        self._acking = 0
        self._acked = asyncio.Event()

    async def _accept(
        self,
        stream_key: Any,
        entries: Sequence[Any],
        *,
        counts: dict[str, int] | None = None,
        lag: int | None = None,
    ) -> None:
        """Queue deliveries of ``entries`` (``(id, fields)`` pairs) of one stream, all before
        the first ``await`` (a cancelled read loses none), then acknowledge the skipped ones.
        ``counts``: deliveries so far per entry id (default 1); ``lag``: entries waiting
        behind the first one."""
        if not entries:
            return
        stream = text(stream_key)
        skipped: list[str] = []
        covered = parse_id(self._listed_upto.get(stream, "0-0"))
        for index, (raw_id, fields) in enumerate(entries):
            entry_id = text(raw_id)
            if not fields:  # a pending entry trimmed or deleted meanwhile: nothing to deliver
                log.warning("entry %s of %s was trimmed before being handled", entry_id, stream)
                skipped.append(entry_id)
                self._pending_trimmed.add(stream)
                continue
            if self.group is not None and parse_id(entry_id) <= covered:
                skipped.append(entry_id)  # the list this watch began with covers it
                continue
            envelope = self._decode(stream, entry_id, fields)
            if envelope is not None:
                attempt = (counts or {}).get(entry_id, 1)
                pending = None if lag is None else max(0, lag - index - 1)
                self._ready.append(
                    self._delivery(
                        stream, entry_id, envelope, fields=fields, attempt=attempt,
                        pending=pending,
                    )
                )  # fmt: skip
            elif self.config.on_decode_error == "skip":
                skipped.append(entry_id)
        last = max((text(entry[0]) for entry in entries), key=parse_id)
        if parse_id(last) > parse_id(self._cursor[stream]):
            self._cursor[stream] = last
            if self.group is None and stream in self._entries_read:
                self._entries_read[stream] += len(entries)
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
        self,
        stream: str,
        entry_id: str,
        envelope: Envelope,
        *,
        fields: Any,
        initial: bool = False,
        attempt: int = 1,
        pending: int | None = None,
    ) -> Delivery:
        durable = self.group is not None and not initial

        async def ack() -> None:
            if durable:
                await self._ack(stream, entry_id)

        async def nak(delay_s: float) -> None:
            self._seq += 1
            delay_s = max(0.0, delay_s)
            # without the group's count, this process counts the deliveries itself
            again = (
                delivery
                if durable
                else dataclasses.replace(delivery, initial=False, attempt=delivery.attempt + 1)
            )
            # the entry has been idle since its delivery, so at least delay_s by then, unless
            # another consumer claimed it meanwhile (- 1: the server counts whole ms)
            idle_ms = max(0, int(delay_s * 1000) - 1) if durable else None
            due = asyncio.get_running_loop().time() + delay_s
            heapq.heappush(self._retries, _Retry(due, self._seq, stream, entry_id, again, idle_ms))

        async def dead_letter(error: str) -> bool:
            return await self._dead_letter(
                stream, entry_id, fields, delivery.attempt, error, durable=durable
            )

        delivery = Delivery(
            envelope,
            initial=initial,
            attempt=attempt,
            max_attempts=self.config.max_deliveries,
            position=parse_id(entry_id),
            pending=pending,
            _ack=ack,
            _nak=nak,
            _dead_letter=dead_letter if self.config.dead_letters else None,
        )
        return delivery

    async def _dead_letter(
        self, stream: str, entry_id: str, fields: Any, attempt: int, error: str, *, durable: bool
    ) -> bool:
        """``XADD`` the entry with ``error`` to the source's dead-letter stream, then ``XACK``."""
        if self._closed:
            return False
        source = stream[len(self.config.stream_prefix) :]
        target = self.config.dead_letter_prefix + source
        consumer = f"{self.group}/{self.consumer}" if self.group is not None else self.consumer
        extra = dead_letter_fields(error, attempt, consumer, f"{stream}:{entry_id}")
        flat: list[Any] = []
        for name, value in {**dict(fields), **extra}.items():
            flat += [name, value]
        try:
            await self._command(
                "XADD", target, "MAXLEN", "~", DEAD_LETTER_MAX_MSGS, "*", *flat
            )  # fmt: skip
        except (redis.exceptions.RedisError, *RETRYABLE) as exc:
            log.warning(
                "could not dead-letter entry %s of %s to %s: %s", entry_id, stream, target, exc
            )
            return False
        if durable:
            await self._ack(stream, entry_id)
        return True

    async def _ack(self, stream: str, *entry_ids: str) -> None:
        """``XACK``; a failure is logged, not raised: the entry stays pending (at least once)."""
        if self.group is None or self._closed or not entry_ids:  # closed: stays pending
            return
        self._acking += 1
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
        finally:
            self._acking -= 1
            if not self._acking:
                self._acked.set()

    async def _acks_done(self, timeout_s: float) -> None:
        """Wait (bounded) for acknowledgements in flight, e.g. before closing the client."""
        if self._acking:
            self._acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), timeout_s)

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
