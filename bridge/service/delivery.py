"""Delivery of one source: poll -> diff -> encode -> publish -> all acks -> commit state.

State only advances after the broker acknowledged every event of a changeset. A failed
publish keeps the changeset *pending*: it is published again (same event ids, so the broker
drops whatever had landed) after a backoff, and the source is not polled again until the
pending changeset is committed, so no change is lost and none is reordered. A failed state
commit after acknowledged publishes is retried without publishing again. Cancelling the task
at any point loses nothing: what was not committed is re-derived, with the same ids, by the
next leader or the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.errors import BridgeError, StateError
from bridge.sinks import Sink
from bridge.sources.base import Changeset, StatefulSource
from bridge.state import StateStore
from bridge.watching import (
    Clock,
    ExternalSource,
    LoopClock,
    Schedule,
    WatchConfig,
    log_poll_failure,
)

__all__ = ["PublishedCallback", "SourceLoop", "SourceSpec"]

log = logging.getLogger("bridge.delivery")

PublishedCallback = Callable[[str, Sequence[CloudEvent]], Awaitable[None] | None]


@dataclass(kw_only=True, slots=True)
class SourceSpec:
    """One configured source, ready to run."""

    name: str
    source: ExternalSource
    watch: WatchConfig
    source_uri: str
    max_inline_body_bytes: int = 64 * 1024


@dataclass(slots=True)
class _Pending:
    changeset: Changeset
    events: list[CloudEvent]
    revision: int
    published: bool = False


class SourceLoop:
    """Runs one source until cancelled or :meth:`stop` is called."""

    def __init__(
        self,
        spec: SourceSpec,
        sink: Sink,
        state: StateStore,
        *,
        clock: Clock | None = None,
        on_published: PublishedCallback | None = None,
    ) -> None:
        self.spec = spec
        self.sink = sink
        self.state = state
        self.clock = clock or LoopClock()
        self.on_published = on_published
        self.encoder = EventEncoder(
            spec.name, spec.source_uri, max_inline_body_bytes=spec.max_inline_body_bytes
        )
        self.revision = 0
        self.committed_batches = 0
        self._pending: _Pending | None = None
        self._stopping = False
        self.busy = False
        """True while a poll, publish or commit is in progress (not while waiting)."""
        self.steps = 0
        """Completed rounds (poll-publish-commit, or a retry), successful or not."""
        self._stepped = asyncio.Condition()

    def stop(self) -> None:
        """Finish the step in progress, then return from :meth:`run`."""
        self._stopping = True

    async def run(self) -> None:
        await self.restore()
        schedule = Schedule(self.spec.watch, self.clock.monotonic())
        while not self._stopping:
            self.busy = True
            try:
                error = await self.step()
            finally:
                self.busy = False
            async with self._stepped:
                self.steps += 1
                self._stepped.notify_all()
            if self._stopping:
                break
            delay = schedule.next_delay(self.clock.monotonic(), ok=error is None)
            if error is not None:
                self._log_failure(error, schedule.failures, delay)
            await self.clock.sleep(delay)

    def _log_failure(self, error: Exception, failures: int, delay_s: float) -> None:
        pending = self._pending
        if pending is None:  # the poll itself failed
            log_poll_failure(self.spec.name, error, failures, delay_s)
            return
        log.warning(
            "source %r: %s %d event(s) failed (%d in a row), kept pending, retrying in %.2fs: %s",
            self.spec.name,
            "committing the state of" if pending.published else "publishing",
            len(pending.events),
            failures,
            delay_s,
            error,
            exc_info=None if isinstance(error, BridgeError) else error,
        )

    async def restore(self) -> None:
        source = self.spec.source
        if not isinstance(source, StatefulSource):
            return
        try:
            checkpoint = await self.state.load(self.spec.name)
        except StateError as exc:
            log.error("source %r: %s; resyncing from a full poll", self.spec.name, exc)
            return
        if checkpoint is not None:
            source.restore(checkpoint.state)
            self.revision = checkpoint.revision
            log.info(
                "source %r: resumed at revision %d (%d state entries)",
                self.spec.name,
                checkpoint.revision,
                len(checkpoint.state),
            )

    async def step(self) -> Exception | None:
        """One poll-publish-commit round (or a retry of a pending one); the error if any."""
        name = self.spec.name
        if self._pending is None:
            try:
                changeset = await self._changes()
            except Exception as exc:
                return exc
            revision = self.revision + 1 if changeset.events else self.revision
            events = [self.encoder.encode(e, revision) for e in changeset.events]
            self._pending = _Pending(changeset, events, revision)
        pending = self._pending
        try:
            if pending.events and not pending.published:
                await self.sink.publish(name, pending.events)
                pending.published = True
                await self._notify(pending.events)
            if pending.changeset.delta or pending.revision != self.revision:
                await self.state.commit(name, pending.revision, pending.changeset.delta)
        except Exception as exc:  # kept pending and retried, never fatal
            return exc
        pending.changeset.commit()
        self.revision = pending.revision
        self.committed_batches += bool(pending.events)
        self._pending = None
        return None

    async def _changes(self) -> Changeset:
        source = self.spec.source
        if isinstance(source, StatefulSource):
            return await source.changes()
        # A plain ExternalSource advanced its own state already: its events stay pending
        # here until published, so they are not lost, but a crash before that loses them.
        events = list(await source.poll())
        return Changeset(events, {}, {})

    async def _notify(self, events: Sequence[CloudEvent]) -> None:
        if self.on_published is None:
            return
        try:
            result = self.on_published(self.spec.name, events)
            if result is not None:
                await result
        except Exception:
            log.exception("source %r: on_published callback failed", self.spec.name)

    async def wait_for_steps(self, steps: int) -> None:
        """Wait until :attr:`steps` reaches ``steps`` (bound it with ``asyncio.timeout``)."""
        async with self._stepped:
            await self._stepped.wait_for(lambda: self.steps >= steps)

    def status(self) -> dict[str, Any]:
        """What this loop holds, for status output."""
        pending = self._pending
        return {
            "revision": self.revision,
            "pending_events": len(pending.events) if pending else 0,
            "pending_published": bool(pending and pending.published),
        }
