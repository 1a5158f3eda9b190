"""Delivery of one source: poll -> diff -> encode -> publish -> all acks -> commit state.

State only advances after the broker acknowledged every event of a changeset. A failed
publish leaves the batch's intent recorded (see :mod:`bridge.state`); after a backoff the
source's checkpoint is loaded again and the source polled again in replay mode, as after a
restart: what is unchanged since goes out again with the same event ids (the broker drops
whatever had landed), what changed meanwhile (a bad file deleted, say) is diffed against the
intent's state, so no change is lost, none is reordered and a batch that cannot go out does
not stall its source for ever. A plain :class:`~bridge.watching.ExternalSource` (no state to
replay) gets its pending events published again instead. A failed state commit after
acknowledged publishes is retried without publishing or polling again. Cancelling the task at
any point loses nothing: what was not committed is re-derived, with the same ids, by the next
leader or the next start.

Before a batch is published, events that cannot be (an undecodable key, data that fails its
schema, a message over the broker's size limit) are left out of it, logged and counted, and
their state is not committed, so they come back at the next poll: see
:mod:`bridge.service.vetting`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from bridge.aio import stop_with_grace
from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.errors import BridgeError, FencedError, StateError
from bridge.events import ExternalEvent
from bridge.service.vetting import Rejections, encode_checked
from bridge.sinks import Sink, SizeLimitedSink
from bridge.sources.base import Changeset, Replay, StateDelta, StatefulSource
from bridge.state import Intent, StateStore, apply_delta
from bridge.state.recovery import recover
from bridge.telemetry.hooks import SourceTelemetry
from bridge.watching import (
    Clock,
    ExternalSource,
    Lag,
    LoopClock,
    Schedule,
    WatchConfig,
    log_poll_failure,
    log_recovery,
)

__all__ = ["PublishedCallback", "SourceLoop", "SourceSpec", "stop_loops"]

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
    max_batch_events: int = 1000
    """A changeset with more events is published and committed in batches of this size."""


@dataclass(slots=True)
class _Pending:
    """One batch on its way: publish (after recording the intent), then commit."""

    changeset: Changeset
    event_revision: int
    """The revision the events' ids are derived from (that of the whole changeset)."""
    commit_revision: int
    """The source's revision once this batch is committed (unchanged for all but the last)."""
    intent: Intent | None = None
    """What is recorded before publishing (None: this batch needs no intent)."""
    replay: Replay | None = None
    """The replay this batch's changeset came from, if any."""
    sole: bool = False
    """The whole changeset is this one batch."""
    events: list[CloudEvent] | None = None
    intent_recorded: bool = False
    published: bool = False


def _removed_versions(part: Changeset, replay: Replay) -> dict[str, str]:
    """The version of each ``Removed`` of a replayed batch whose item the committed state does
    not hold (it was in the replayed intent): see ``Intent.removed``."""
    found: dict[str, str] = {}
    for event in part.events:
        if event.kind != "removed":
            continue
        key = getattr(event.resource, "key", None)
        version = getattr(event.resource, "version", None)
        if (
            isinstance(key, str)
            and isinstance(version, str)
            and key not in replay.before
            and key in part.delta
            and part.delta[key] is None
        ):
            found[key] = version
    return found


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
        guard: Callable[[], None] | None = None,
        telemetry: SourceTelemetry | None = None,
        slots: asyncio.Semaphore | None = None,
        lag: Lag | None = None,
        offset_s: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.slots = slots
        """Shared by the sources of a service: a step (poll, publish, commit) runs holding one
        of its slots, which bounds the polls and publishes in flight."""
        self.lag = lag
        self.offset_s = offset_s
        """Seconds from the start to the first poll (the source's phase, see
        :func:`bridge.watching.start_offset_s`)."""
        self.rng = rng
        self._stateful = isinstance(spec.source, StatefulSource)
        """Checked once: a runtime Protocol check costs more than a poll answered 304."""
        self.telemetry = telemetry or SourceTelemetry(spec.name)
        """Spans and metrics of each poll and publish (none by default)."""
        self.guard = guard
        """Called before every poll, publish and state write; raises to stop them (a lost
        lease)."""
        self.sink = sink
        self.state = state
        self.clock = clock or LoopClock()
        self.on_published = on_published
        self.encoder = EventEncoder(
            spec.name, spec.source_uri, max_inline_body_bytes=spec.max_inline_body_bytes
        )
        self.revision = 0
        self.committed_batches = 0
        self._queue: list[_Pending] = []
        """The batches of the changeset being delivered, in order."""
        self._replay: tuple[Replay, int] | None = None
        """A recorded intent (and its revision) to settle with the next poll."""
        self._resync = False
        """A publish failed: load the checkpoint again and poll in replay mode (see above)."""
        self._sized = isinstance(sink, SizeLimitedSink)
        self._rejected: dict[str, tuple[str, str]] = {}
        """Items rejected in the last round (key -> reason, detail): logged once as errors."""
        self._rejected_now: dict[str, tuple[str, str]] = {}
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
        if self.offset_s > 0:
            await self.clock.sleep(self.offset_s)
        schedule = Schedule(self.spec.watch, self.clock.monotonic(), self.rng)
        while not self._stopping:  # a state store that is down delays the start, not kills it
            try:
                await self.restore()
                break
            except FencedError:
                raise
            except Exception as exc:
                delay = schedule.next_delay(self.clock.monotonic(), ok=False)
                log.warning(
                    "source %r: loading its checkpoint failed, retrying in %.2fs: %s",
                    self.spec.name,
                    delay,
                    exc,
                )
                await self.clock.sleep(delay)
        due = self.clock.monotonic()
        schedule = Schedule(self.spec.watch, due, self.rng)
        failing_since = 0.0
        while not self._stopping:
            async with self.slots or contextlib.nullcontext():
                if self.lag is not None:
                    self.lag.observe(self.spec.name, self.clock.monotonic() - due)
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
            missed = schedule.missed
            now = self.clock.monotonic()
            if error is None and schedule.failures:
                log_recovery(self.spec.name, schedule.failures, now - failing_since)
            elif error is not None and not schedule.failures:
                failing_since = now
            delay = schedule.next_delay(now, ok=error is None)
            if self.lag is not None:
                self.lag.skipped(schedule.missed - missed)
            if error is not None:
                self._log_failure(error, schedule.failures, delay)
            due = now + delay
            await self.clock.sleep(delay)

    def _log_failure(self, error: Exception, failures: int, delay_s: float) -> None:
        if not self._queue:  # the poll itself failed
            log_poll_failure(self.spec.name, error, failures, delay_s)
            return
        pending = self._queue[0]
        if pending.published:
            then = "committing again"
        elif self._resync:
            then = "polling again (against the checkpoint)"
        else:
            then = "publishing again"
        log.warning(
            "source %r: %s %d event(s) failed (%d in a row), %s in %.2fs: %s",
            self.spec.name,
            "committing the state of" if pending.published else "publishing",
            len(pending.events if pending.events is not None else pending.changeset.events),
            failures,
            then,
            delay_s,
            error,
            exc_info=None if isinstance(error, BridgeError) else error,
        )

    async def restore(self, *, resync: bool = False) -> None:
        """Load the checkpoint; a recorded intent becomes the first batch to deliver.
        ``resync``: again, after a failed publish (logged at debug)."""
        source = self.spec.source
        if not self._stateful:
            return
        assert isinstance(source, StatefulSource)
        try:
            checkpoint = await self.state.load(self.spec.name)
        except FencedError:
            raise
        except StateError as exc:
            log.error("source %r: %s; resyncing from a full poll", self.spec.name, exc)
            await self.state.reset(self.spec.name)
            checkpoint = None
        if checkpoint is None:
            # The broker is the fallback checkpoint (bridge.state.recovery).
            recovered = await recover(source, self.sink, self.spec.name)
            if recovered is not None:
                delta: StateDelta = dict(recovered.state)
                await self.state.commit(self.spec.name, recovered.revision, delta)
                source.restore(recovered.state)
                self.revision = recovered.revision
                return
            # A new lineage of state starts at a random multiple of 2**32, persisted at once, so
            # the ids of its events never repeat those of a lost earlier state (the low 32 bits
            # count committed changesets).
            revision = secrets.randbits(31) << 32
            await self.state.commit(self.spec.name, revision, {})
            source.restore({})
            self.revision = revision
            return
        self.revision = checkpoint.revision
        log.log(
            logging.DEBUG if resync else logging.INFO,
            "source %r: %s at revision %d (%d state entries)%s",
            self.spec.name,
            "re-polling after a failed publish" if resync else "resumed",
            checkpoint.revision,
            len(checkpoint.state),
            ", republishing an unsettled batch" if checkpoint.intent else "",
        )
        if checkpoint.intent is not None:
            # The batch may have been published: poll against the state it led to, and emit
            # again (same ids) what has not changed since. See bridge.state and Replay.
            intent = checkpoint.intent
            after = dict(checkpoint.state)
            apply_delta(after, intent.delta)
            source.restore(after)
            replay = Replay(checkpoint.state, intent.delta, intent.removed)
            self._replay = (replay, intent.revision)
        else:
            source.restore(checkpoint.state)

    async def step(self) -> Exception | None:
        """Deliver the pending batches, polling first if there are none; the error if any."""
        if self._resync:
            self._queue = []
        if not self._queue:
            try:
                if self.guard is not None:  # a lost lease stops polling too, not just writes
                    self.guard()
                if self._resync:
                    await self.restore(resync=True)
                    self._resync = False
                self._rejected, self._rejected_now = self._rejected_now, {}
                with self.telemetry.poll(self.encoder) as poll:
                    changeset = await self._changes()
                    poll.found(len(changeset.events))
            except Exception as exc:
                return exc
            self._queue = self._batches(changeset)
            self._replay = None
        while self._queue:
            try:
                await self._deliver(self._queue[0])
            except Exception as exc:  # retried, never fatal
                # Not published (or not known to be): poll again, against the checkpoint.
                self._resync = self._stateful and not self._queue[0].published
                return exc
            pending = self._queue.pop(0)
            pending.changeset.commit()
            self.revision = pending.commit_revision
            self.committed_batches += bool(pending.events)
        return None

    def _batches(self, changeset: Changeset) -> list[_Pending]:
        stateful = self._stateful
        if self._replay is not None:
            replay, target = self._replay
        else:
            replay, target = None, self.revision + 1 if changeset.events else self.revision
        parts = changeset.split(self.spec.max_batch_events)
        batches: list[_Pending] = []
        for index, part in enumerate(parts):
            revision = target if index == len(parts) - 1 else self.revision
            pending = _Pending(part, target, revision, replay=replay, sole=len(parts) == 1)
            if part.events and stateful:
                delta = part.delta
                removed: dict[str, str] = {}
                if replay is not None and len(parts) > 1:
                    # Until every batch of a replay is committed, the unsettled rest of the old
                    # intent stays recorded: those events may have been published.
                    later = {k for p in parts[index + 1 :] for k in p.delta if k in replay.delta}
                    delta = {**{k: replay.delta[k] for k in later}, **part.delta}
                    removed = {k: replay.removed[k] for k in later if k in replay.removed}
                if replay is not None:
                    removed.update(_removed_versions(part, replay))
                pending.intent = Intent(target, delta, removed)
            batches.append(pending)
        return batches

    async def _deliver(self, pending: _Pending) -> None:
        name = self.spec.name
        if pending.events is None:
            await self._encode(pending)
        if self.guard is not None:
            self.guard()
        if pending.events and not pending.published:
            if pending.intent is not None and not pending.intent_recorded:
                await self.state.begin(name, pending.intent)
                pending.intent_recorded = True
            if self.guard is not None:
                self.guard()
            with self.telemetry.publish(pending.events):
                await self.sink.publish(name, pending.events)
            pending.published = True
            await self._notify(pending.events)
        if pending.changeset.delta or pending.commit_revision != self.revision or pending.events:
            # The next batch's intent goes in the same write as this commit.
            following = self._queue[1] if len(self._queue) > 1 else None
            next_intent = None
            if following is not None and not following.intent_recorded:
                if following.events is None:  # its rejects are left out of its intent too
                    await self._encode(following)
                next_intent = following.intent
            await self.state.commit(
                name, pending.commit_revision, pending.changeset.delta, next_intent
            )
            if following is not None and next_intent is not None:
                following.intent_recorded = True

    async def _encode(self, pending: _Pending) -> None:
        """Encode the batch's events, leaving out those that cannot be published."""
        events = pending.changeset.events
        encoded, rejected = encode_checked(self.encoder, events, pending.event_revision)
        if self._sized:
            await self._check_sizes(events, encoded, rejected, pending.event_revision)
        if rejected:
            self._reject(pending, rejected)
        pending.events = [e for i, e in enumerate(encoded) if e is not None and i not in rejected]

    async def _check_sizes(
        self,
        events: list[ExternalEvent[Any]],
        encoded: list[CloudEvent | None],
        rejected: Rejections,
        revision: int,
    ) -> None:
        """Reject the events over the broker's size limit; an HTTP event over it because of its
        inlined body goes out without the body (digest and size only), as a larger body would."""
        sink = cast(SizeLimitedSink, self.sink)
        indices = [i for i in range(len(events)) if i not in rejected]
        ready = cast(list[CloudEvent], [encoded[i] for i in indices])
        oversized = await sink.oversized(self.spec.name, ready)
        lean: EventEncoder | None = None
        for position, detail in oversized.items():
            index = indices[position]
            body = ready[position].data.get("body")
            if isinstance(body, dict) and ready[position].dataschema.endswith(
                "/http-resource.json"
            ):
                if lean is None:
                    lean = copy.copy(self.encoder)
                    lean.max_inline_body_bytes = -1
                [smaller] = lean.encode_all([events[index]], revision)
                if not await sink.oversized(self.spec.name, [smaller]):
                    log.warning(
                        "source %r: the body of %s is not inlined: its event would be %s",
                        self.spec.name,
                        smaller.subject,
                        detail,
                    )
                    encoded[index] = smaller
                    continue
            rejected[index] = ("too_large", detail)

    def _reject(self, pending: _Pending, rejected: Rejections) -> None:
        changeset = pending.changeset
        events = [changeset.events[i] for i in sorted(rejected)]
        intent = [pending.intent.delta] if pending.intent is not None else []
        retried = changeset.leave_out(events, pending.replay, intent)
        outcome = (
            "it is tried again at the next poll"
            if retried
            else "it is not tried again (its source keeps no state per item)"
        )
        for index, event in zip(sorted(rejected), events, strict=True):
            reason, detail = rejected[index]
            key = getattr(event.resource, "key", None)
            item = key if isinstance(key, str) else repr(event.resource)[:200]
            self.telemetry.rejected(reason)
            seen = self._rejected.get(item) == (reason, detail)
            self._rejected_now[item] = (reason, detail)
            log.log(
                logging.DEBUG if seen else logging.ERROR,
                "source %r: item %s left out (%s): %s; %s",
                self.spec.name,
                ascii(item),
                reason,
                detail,
                outcome,
            )
        if pending.sole and not changeset.events and not changeset.delta:
            pending.commit_revision = self.revision  # nothing to commit

    async def _changes(self) -> Changeset:
        source = self.spec.source
        if self._stateful:
            source = cast(StatefulSource, source)
            if self._replay is not None:
                return await source.changes(self._replay[0])
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
        return {
            "revision": self.revision,
            "pending_events": sum(len(p.changeset.events) for p in self._queue),
            "steps": self.steps,
        }


async def stop_loops(
    running: Sequence[tuple[SourceLoop, asyncio.Task[Any]]],
    grace_s: float,
    *,
    on_late: Callable[[asyncio.Task[Any]], None] | None = None,
) -> None:
    """Stop source loops, each running in its task: an idle loop's task is cancelled at once;
    one in the middle of a step (a publish) finishes it within ``grace_s``, then its task is
    cancelled (``on_late`` is told first). Safe: state is committed only after acks."""
    for loop, task in running:
        loop.stop()
        if not loop.busy:
            task.cancel()
    await stop_with_grace([task for _, task in running], grace_s, on_late=on_late)
