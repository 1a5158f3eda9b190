"""The broker as the fallback checkpoint: rebuild a source's state from what was published.

A source that has no checkpoint (no state store kept one: the in-memory store after a restart,
a first start, a checkpoint lost with a Redis that had no persistence, or reset as corrupt) is
not started from an empty state, which would announce every item again under new ids. The sink
is asked what it holds instead (:class:`PublishedReader`): for every item, the ``koprs-kind``,
``koprs-version`` and ``koprs-revision`` of its last event
(:func:`bridge.cloudevents.state_headers`; NATS: a headers-only ``LAST_PER_SUBJECT`` read,
:mod:`bridge.sinks.nats_recovery`; Redis: the items hash and the entries it points at,
:mod:`bridge.sinks.redis_recovery`). Items whose last event is not ``Removed`` are live; the
source turns them into its state (:class:`~bridge.sources.base.RecoverableSource`), and the
source's revision becomes the largest one found, so the next changeset's ids are those any
restart would derive, and never those of an earlier change (a recreated item is a new
``Added``). The first poll then diffs against what consumers have: unchanged items publish
nothing, items changed or deleted meanwhile give ``Modified`` / ``Removed``.

A live item whose last event cannot be read (trimmed by the stream's limits while the items
hash still names it; published by a version without the headers) is restored with the version
:data:`UNKNOWN_VERSION`, which matches nothing: the first poll announces it again once
(``Modified``, or ``Removed`` if it is gone). Items whose last event left the stream entirely
(``max_age``) are unknown to consumers too, and come as ``Added``.

The recovered state is committed to the state store at once: from then on the checkpoint is
primary again.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bridge.sources.base import RecoverableSource
from bridge.state import Checkpoint

__all__ = ["UNKNOWN_VERSION", "Published", "PublishedReader", "recover"]

log = logging.getLogger("bridge.recovery")

UNKNOWN_VERSION = "?"
"""The version of a live item whose last event could not be read (no version token is ``?``)."""


@dataclass(slots=True)
class Published:
    """What a broker holds of one source."""

    items: dict[str, str] = field(default_factory=dict)
    """Every live item's key and the version token of its last event (:data:`UNKNOWN_VERSION`
    when that event could not be read)."""
    revision: int | None = None
    """The largest revision among the source's last events (None: none carries one)."""
    read: int = 0
    """Last events read (live or not)."""
    unreadable: int = 0
    """Live items restored with :data:`UNKNOWN_VERSION`, or whose key could not be read."""
    warnings: list[str] = field(default_factory=list)
    """Why the broker may not hold every item (stream limits), for the log."""


@runtime_checkable
class PublishedReader(Protocol):
    """A sink that can tell what it holds of a source (see the module docstring)."""

    async def read_published(self, source_name: str) -> Published: ...


async def recover(source: object, sink: object, source_name: str) -> Checkpoint | None:
    """The checkpoint the broker implies for ``source``, or None if it cannot tell (a sink or
    source that does not support recovery, or nothing published yet)."""
    if not isinstance(sink, PublishedReader) or not isinstance(source, RecoverableSource):
        return None
    started = time.monotonic()
    published = await sink.read_published(source_name)
    for warning in published.warnings:
        log.warning("source %r: recovery from the broker may be partial: %s", source_name, warning)
    if published.revision is None and not published.items:
        log.info("source %r: no checkpoint and nothing published yet: a full poll", source_name)
        return None
    state = dict(source.state_from_published(published.items))
    revision = published.revision
    if revision is None:  # only events of a version without the headers: a new lineage
        revision = secrets.randbits(31) << 32
    log.info(
        "source %r: no checkpoint; rebuilt the state of %d live items (of %d last events) at "
        "revision %d from the broker in %.2f s",
        source_name,
        len(published.items),
        published.read,
        revision,
        time.monotonic() - started,
    )
    if published.unreadable:
        log.warning(
            "source %r: the last event of %d live items could not be read from the broker "
            "(trimmed by the stream's limits, or published without the koprs-version header): "
            "they are announced again once",
            source_name,
            published.unreadable,
        )
    return Checkpoint(revision, state)
