"""``Reflector``: the current items of every source, kept up to date from a watch.

Like kube-rs' reflector store: feed it any :class:`~bridge.consumer.base.Watch` and read it at
any time::

    reflector = Reflector()
    task = asyncio.create_task(reflector.run(watch_nats(url, ["files"])))
    await reflector.wait_synced()            # the initial list is in
    config = reflector.get("files", "configs/app.yaml")

or pass the watch through it and handle the items yourself (the store is updated before each
item is handed on)::

    async for item in reflector.reflect(watch):
        ...

How items change the store:

* ``Added`` / ``Modified`` (listed or live): the item's resource is stored under
  ``(source name, item key)``; ``Removed``: the item leaves the store.
* :class:`~bridge.consumer.base.Synced` ends a list: the first one marks the store as synced
  (:meth:`Reflector.wait_synced` returns). One that ends a full list (``Synced.listed``) also
  drops, from the sources it covers (all of them when it names none), every item that was not
  delivered as ``initial`` since the previous one: after a watch lists again (a lost position,
  trimmed history, see :mod:`bridge.consumer.nats`), items that disappeared meanwhile do not
  linger. One that says the watch resumed without listing drops nothing.

So the store equals the source after :meth:`Reflector.wait_synced` when the watch lists: one
without a durable consumer or group, a new one, or one with ``list_on_resume=True``, which lists
even when it resumes an existing durable consumer or group and then goes on from the durable
position after the list, without losing or repeating a change. A watch that resumes without
listing only brings changes: a warning says so, and the items that did not change are missing.

Items are kept in the order deliveries arrive: an event delivered again after a ``nak`` can set
an item back until its later event is delivered again too. :meth:`Reflector.run` acknowledges
each delivery once stored and never naks. The source name is the one the event was published
under (``Envelope.source_name``; ``""`` when it could not be told).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from bridge.consumer.base import Delivery, Synced, Watch, WatchItem
from bridge.consumer.decoding import Envelope

__all__ = ["Reflector"]

log = logging.getLogger(__name__)


class Reflector:
    """A store of the current items per source; see the module docstring."""

    def __init__(self) -> None:
        self._store: dict[str, dict[str, Envelope]] = {}
        self._listed: set[tuple[str, str]] = set()
        """(source, key) delivered as initial since the last Synced."""
        self._synced = asyncio.Event()
        self._changed = asyncio.Event()
        self.changes = 0
        """How many items were applied (deliveries and Synced markers); grows by one each."""

    # -- reading --

    @property
    def synced(self) -> bool:
        """Whether a first initial list was complete."""
        return self._synced.is_set()

    def sources(self) -> list[str]:
        """The names of the sources that have items, sorted."""
        return sorted(name for name, items in self._store.items() if items)

    def items(self, source: str) -> dict[str, Any]:
        """A snapshot of the source's items: key -> resource (empty for an unknown source)."""
        return {key: env.event.resource for key, env in self._store.get(source, {}).items()}

    def envelopes(self, source: str) -> dict[str, Envelope]:
        """A snapshot of the source's items with their CloudEvent context: key -> Envelope."""
        return dict(self._store.get(source, {}))

    def get(self, source: str, key: str, default: Any = None) -> Any:
        """The resource of one item, or ``default``."""
        envelope = self._store.get(source, {}).get(key)
        return default if envelope is None else envelope.event.resource

    def __len__(self) -> int:
        return sum(len(items) for items in self._store.values())

    def __repr__(self) -> str:
        state = "synced" if self.synced else "listing"
        return f"<Reflector {len(self)} items of {len(self.sources())} sources, {state}>"

    async def wait_synced(self) -> None:
        """Return once the initial list is complete (at once if it is)."""
        await self._synced.wait()

    async def wait_for(self, predicate: Callable[[Reflector], bool]) -> None:
        """Return once ``predicate(self)`` holds; it is checked after every change."""
        while not predicate(self):
            changed = self._changed
            await changed.wait()

    # -- feeding --

    def apply(self, item: WatchItem) -> None:
        """Update the store from one watch item."""
        if isinstance(item, Synced):
            if item.listed:
                self._relisted(item.sources)
            elif not self.synced:
                log.warning(
                    "reflector: the watch resumed a durable position without listing: items "
                    "that did not change since are missing (give the watch list_on_resume=True)"
                )
            self._synced.set()
        elif isinstance(item, Delivery):
            self._apply(item)
        else:  # pragma: no cover - guarded by the types
            raise TypeError(f"not a watch item: {item!r}")
        self.changes += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _apply(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        source = envelope.source_name or ""
        if envelope.kind == "removed":
            items = self._store.get(source)
            if items is not None:
                items.pop(envelope.key, None)
            self._listed.discard((source, envelope.key))
            return
        self._store.setdefault(source, {})[envelope.key] = envelope
        if delivery.initial:
            self._listed.add((source, envelope.key))

    def _relisted(self, sources: tuple[str, ...]) -> None:
        covered = sources or tuple(self._store)
        for source in covered:
            items = self._store.get(source)
            if not items:
                continue
            for key in [k for k in items if (source, k) not in self._listed]:
                del items[key]
        self._listed = {(s, k) for s, k in self._listed if s not in covered}

    async def reflect(self, watch: Watch) -> AsyncIterator[WatchItem]:
        """Pass the watch's items through, applying each to the store before handing it on.

        Deliveries are not acknowledged here: that is the caller's job.
        """
        async for item in watch:
            self.apply(item)
            yield item

    async def run(self, watch: Watch) -> None:
        """Apply every item of the watch, acknowledging each delivery once stored; return when
        the watch ends (cancel the task, or close the watch, to stop)."""
        async for item in watch:
            self.apply(item)
            if isinstance(item, Delivery):
                await item.ack()
