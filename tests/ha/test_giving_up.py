"""A source given up by a rebalance is not taken again by the same replica until its old loop
(a publish in flight) has ended and its lease is released."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from bridge import MemoryStore, ObjectStorePoller
from bridge.ha.keys import replicas_key
from bridge.ha.leases import Lease, LeaseClient
from bridge.ha.sharing import Coordinator
from bridge.service.delivery import SourceSpec
from bridge.sinks.memory import MemorySink
from bridge.watching import WatchConfig

PREFIX = "koprs:bridge:"


async def test_a_source_being_given_up_is_not_acquired_again_until_released(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "bridge.ha")
    stores = {name: MemoryStore() for name in ("s1", "s2")}
    await stores["s2"].put("k", b"1")  # s2 (given up first) has an event to publish
    specs = [
        SourceSpec(
            name=name,
            source=ObjectStorePoller(store).with_name(name),
            watch=WatchConfig(0.05),
            source_uri="memory://t",
        )
        for name, store in stores.items()
    ]
    sink = MemorySink()
    sink.block()
    coordinator = Coordinator(specs, sink, redis_client, replica="b", lease_ttl_s=30, prefix=PREFIX)
    await coordinator.round()  # alone: b leads both
    assert set(coordinator.led) == {"s1", "s2"}
    old = coordinator.led["s2"]
    await sink.wait_for_calls(1)  # s2's publish is in flight

    other = LeaseClient(redis_client, "a", ttl_s=30, prefix=PREFIX)
    await other.heartbeat([])  # a replica joins: b's share is 1
    await coordinator.round()
    assert set(coordinator.led) == {"s1"}  # s2 given up, its publish still in flight
    assert not old.task.done()

    await redis_client.zrem(replicas_key(PREFIX), "a")  # it leaves again: b's share is 2
    await coordinator.round()
    # Not taken again while its old loop runs: two loops of s2 would race.
    assert set(coordinator.led) == {"s1"}
    assert not old.task.done()

    sink.unblock()
    await asyncio.wait_for(old.task, 10)
    await asyncio.gather(*coordinator._leaving)
    assert "released the lease on source 's2'" in caplog.text
    await coordinator.round()
    assert set(coordinator.led) == {"s1", "s2"}
    new = coordinator.led["s2"]
    assert new.lease.fence > old.lease.fence
    assert coordinator.held["s2"] is new.lease
    await stores["s2"].put("k", b"2")
    async with asyncio.timeout(10):
        await new.loop.wait_for_steps(new.loop.steps + 2)  # the new loop commits
    assert [e.type.split(".")[-2] for e in sink.events("s2")] == ["added", "modified"]
    stop = asyncio.Event()
    stop.set()
    await coordinator.run(stop)
    assert coordinator.led == {}


async def test_a_lease_given_up_but_not_released_is_released_at_the_next_round(
    redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release that failed (Redis unreachable at that moment) leaves the lease held by a live
    member that does not poll the source; with membership leases it never expires by itself.
    The replica's next round gives it back, so another replica can take it."""
    specs = [
        SourceSpec(
            name=name,
            source=ObjectStorePoller(MemoryStore()).with_name(name),
            watch=WatchConfig(0.05),
            source_uri="memory://t",
        )
        for name in ("s1", "s2")
    ]
    coordinator = Coordinator(
        specs, MemorySink(), redis_client, replica="b", lease_ttl_s=30, prefix=PREFIX
    )
    await coordinator.round()  # alone: b leads both
    assert set(coordinator.led) == {"s1", "s2"}
    given_up = coordinator.led["s2"]

    release = coordinator.leases._release_script
    failures: list[list[str]] = []

    async def unreachable(leases: Sequence[Lease], *, leave: bool) -> int:
        if not failures:
            failures.append([lease.source for lease in leases])
            raise redis.exceptions.ConnectionError("Redis unreachable (the test)")
        return await release(leases, leave=leave)

    monkeypatch.setattr(coordinator.leases, "_release_script", unreachable)
    other = LeaseClient(redis_client, "a", ttl_s=30, prefix=PREFIX)
    await other.heartbeat([])  # a replica joins: b's share is 1, it gives s2 up
    await coordinator.round()
    async with asyncio.timeout(10):
        await asyncio.gather(*coordinator._leaving)
    assert given_up.task.done()
    assert failures == [["s2"]]
    assert set(coordinator.led) == {"s1"}
    beat = await other.heartbeat(["s2"])
    assert beat.holder("s2") == "b"  # still b's, yet b does not poll it
    assert await other.acquire_many(["s2"]) == []

    await coordinator.round()
    assert set(coordinator.led) == {"s1"}  # within its share: b does not take it again
    beat = await other.heartbeat(["s2"])
    assert beat.holder("s2") is None
    [taken] = await other.acquire_many(["s2"])
    assert taken.fence > given_up.lease.fence
    stop = asyncio.Event()
    stop.set()
    await coordinator.run(stop)
