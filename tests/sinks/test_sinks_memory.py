"""MemorySink specifics: injected failures, holding publishes, awaiting events.

The behaviour every sink shares is in ``test_sinks_contract.py`` (``[memory]`` there).
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.errors import PublishError
from bridge.events import Modified, Removed
from bridge.sinks.memory import MemorySink
from tests.support.events import object_events


async def test_fail_next_fails_whole_publishes() -> None:
    sink = MemorySink()
    events = object_events(["a", "b"])
    sink.fail_next(2, message="broker on fire")
    for _ in range(2):
        with pytest.raises(PublishError, match=r"2 of 2 events .*broker on fire"):
            await sink.publish("files", events)
    assert sink.count() == 0
    await sink.publish("files", events)
    assert sink.events("files") == events
    assert sink.publish_calls == 3


async def test_a_partly_landed_batch_is_completed_by_the_retry() -> None:
    sink = MemorySink()
    events = object_events(["a", "b", "c"])
    sink.fail_next(landed=2)
    with pytest.raises(PublishError, match="1 of 3 events"):
        await sink.publish("files", events)
    assert sink.events("files") == events[:2]
    await sink.publish("files", events)
    assert sink.events("files") == events
    assert sink.duplicates == 2


async def test_items_are_the_current_state() -> None:
    sink = MemorySink()
    added = object_events(["a", "b"])
    modified = object_events(["a"], kind=Modified, revision=2, etag="e2")
    removed = object_events(["b"], kind=Removed, revision=2)
    await sink.publish("files", [*added, *modified, *removed])
    assert sink.items("files") == {"a": modified[0]}
    assert sink.items("unknown") == {}


async def test_wait_for_wakes_when_enough_events_landed() -> None:
    sink = MemorySink()
    waiter = asyncio.create_task(sink.wait_for(3, "files"))
    await sink.publish("other", object_events(["x"], source_name="other"))
    await sink.publish("files", object_events(["a", "b"]))
    assert not waiter.done()
    await sink.publish("files", object_events(["c"]))
    assert [e.subject for e in await waiter] == ["a", "b", "c"]
    assert len(await sink.wait_for(4)) == 4  # all sources, already there


async def test_block_holds_publishes_until_unblocked() -> None:
    sink = MemorySink()
    sink.block()
    publishing = asyncio.create_task(sink.publish("files", object_events(["a"])))
    waiter = asyncio.create_task(sink.wait_for(1))
    await sink.wait_for_calls(1)  # the publish started and is held
    assert sink.publish_calls == 1
    assert sink.count() == 0
    sink.unblock()
    await publishing
    assert len(await waiter) == 1


async def test_connect_and_close_are_recorded() -> None:
    sink = MemorySink("mine")
    assert sink.description == "memory://mine"
    await sink.connect()
    assert sink.connected
    await sink.aclose()
    assert not sink.connected
