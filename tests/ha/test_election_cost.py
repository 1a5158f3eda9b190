"""Leader election costs O(replicas): Redis commands per renewal period, counted as Redis counts
them (``INFO commandstats``, commands inside scripts included), and round trips per period, do
not grow with the number of sources; a lost lease or membership stops its sources at once;
shutdown gives every lease back in one script."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge import MemoryStore, ObjectStorePoller, watching
from bridge.connections import redis_client
from bridge.errors import StateError
from bridge.ha.keys import SourceKeys, replicas_key
from bridge.ha.leases import LeaseClient
from bridge.ha.sharing import Coordinator
from bridge.service.delivery import SourceSpec
from bridge.sinks.memory import MemorySink
from bridge.watching import WatchConfig

PREFIX = "koprs:bridge:"


@pytest.fixture(autouse=True)
def no_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sources start at once (no spread of their first polls): the tests wait for those."""
    monkeypatch.setattr(watching, "START_RATE_PER_S", float("inf"))


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    # As the service builds it: a command waits for a free connection of the pool.
    redis = redis_client(redis_url, max_connections=16, pool_timeout_s=30)
    yield redis
    await redis.aclose()


def specs(n: int) -> list[SourceSpec]:
    return [
        SourceSpec(
            name=f"s{i:05}",
            source=ObjectStorePoller(MemoryStore()).with_name(f"s{i:05}"),
            watch=WatchConfig(3600),  # one poll at the start, then quiet
            source_uri="memory://t",
        )
        for i in range(n)
    ]


def coordinator(client: aioredis.Redis, n: int, replica: str = "r1") -> Coordinator:
    return Coordinator(
        specs(n), MemorySink(), client, replica=replica, lease_ttl_s=30, prefix=PREFIX
    )


class RoundTrips:
    """Counts the commands a client sends (each one a round trip: no pipelines are used)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.count = 0
        execute: Callable[..., Any] = redis.execute_command

        async def counted(*args: Any, **options: Any) -> Any:
            self.count += 1
            return await execute(*args, **options)

        redis.execute_command = counted  # type: ignore[method-assign]


async def commands(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(
        int(value["calls"])
        for name, value in stats.items()
        if name not in ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_config")
    )


async def steady(coordinator: Coordinator) -> None:
    """Take every source and let each loop finish its first poll (its only Redis work)."""
    await coordinator.round()
    for led in coordinator.led.values():
        await led.loop.wait_for_steps(1)


async def cost_of_rounds(client: aioredis.Redis, n: int, rounds: int = 3) -> tuple[int, int]:
    """(Redis commands, client round trips) per round of a replica leading ``n`` sources."""
    leader = coordinator(client, n)
    await steady(leader)
    assert len(leader.led) == n
    trips = RoundTrips(leader.control)
    await client.config_resetstat()
    for _ in range(rounds):
        await leader.round()
    counted, trips_made = await commands(client), trips.count
    assert all(led.lease.valid() for led in leader.led.values())
    stop = asyncio.Event()
    stop.set()
    await leader.run(stop)
    return counted // rounds, trips_made // rounds


async def test_commands_per_renewal_period_do_not_grow_with_the_sources(
    client: aioredis.Redis,
) -> None:
    small = await cost_of_rounds(client, 20)
    await client.flushall()
    large = await cost_of_rounds(client, 1200)
    assert small[1] == large[1] == 1  # one round trip per period
    # The heartbeat script: EVALSHA, TIME, ZADD, ZREMRANGEBYSCORE, ZRANGE + one MGET per 1000.
    assert small[0] <= 5 + math.ceil(20 / 1000)
    assert large[0] <= 5 + math.ceil(1200 / 1000)


async def test_a_replica_short_of_its_share_does_not_retry_every_held_source(
    client: aioredis.Redis,
) -> None:
    """With 2 live replicas and 41 sources, the one leading 20 is short of its share (21) for
    good: its rounds must not try to acquire the 21 sources the other leads."""
    a, b = coordinator(client, 41, "a"), coordinator(client, 41, "b")

    async def round_of(c: Coordinator) -> None:
        await c.round()
        await asyncio.gather(*list(c._leaving))  # its give-ups (in the background) are done

    await round_of(a)  # a alone takes all 41
    await round_of(b)  # b is live: nothing is free yet
    await round_of(a)  # a learns it has to share and gives up 20
    for _ in range(3):
        await round_of(b)  # b takes what a released
        await round_of(a)
    assert sorted((len(a.led), len(b.led))) == [20, 21]
    short = a if len(a.led) == 20 else b
    await asyncio.gather(*(led.loop.wait_for_steps(1) for c in (a, b) for led in c.led.values()))
    trips = RoundTrips(short.control)
    await client.config_resetstat()
    await short.round()
    assert trips.count == 1
    assert await commands(client) <= 5 + 1
    stop = asyncio.Event()
    stop.set()
    await asyncio.gather(a.run(stop), b.run(stop))


async def test_release_of_every_lease_is_one_script(client: aioredis.Redis) -> None:
    leader = coordinator(client, 300)
    await steady(leader)
    trips = RoundTrips(leader.control)
    stop = asyncio.Event()
    stop.set()
    await leader.run(stop)
    # EVALSHA (on a server that does not know the script yet: NOSCRIPT, SCRIPT LOAD, EVALSHA)
    assert trips.count <= 3
    assert leader.led == {}
    assert await client.exists(*(SourceKeys(f"s{i:05}", PREFIX).lease for i in range(300))) == 0
    assert await client.zscore(replicas_key(PREFIX), "r1") is None


async def test_a_lease_taken_from_under_a_replica_stops_its_source_at_once(
    client: aioredis.Redis,
) -> None:
    leader = coordinator(client, 3)
    await steady(leader)
    stolen = leader.led["s00001"]
    await client.set(stolen.lease.keys.lease, "intruder|999")
    await leader.round()
    assert stolen.lease.lost.is_set()
    await stolen.task  # its loop stopped
    assert not stolen.lease.valid()
    assert {name for name, led in leader.led.items() if not led.task.done()} == {
        "s00000",
        "s00002",
    }
    stop = asyncio.Event()
    stop.set()
    await leader.run(stop)
    assert await client.get(stolen.lease.keys.lease) == b"intruder|999"  # not ours to delete


async def test_a_membership_not_renewed_in_time_stops_every_source(
    client: aioredis.Redis,
) -> None:
    """Redis unreachable: once the membership's deadline passes, every lease is lost and every
    led source stops, without waiting for the next round."""
    leader = Coordinator(
        specs(4), MemorySink(), client, replica="r1", lease_ttl_s=0.5, renew_every_s=0.1,
        prefix=PREFIX,
    )  # fmt: skip
    await steady(leader)
    tasks = [led.task for led in leader.led.values()]

    async def unreachable(sources: Any) -> Any:
        raise StateError("cannot renew the membership: Redis unreachable (test)")

    leader.leases.heartbeat = unreachable  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(leader.run(stop))
    await asyncio.gather(*tasks)  # every source stops, by the watchdog
    assert all(led.lease.lost.is_set() for led in leader.led.values())
    stop.set()
    await running


async def test_a_dead_members_lease_is_free_and_a_live_members_is_not(
    client: aioredis.Redis,
) -> None:
    a = LeaseClient(client, "a", ttl_s=30, prefix=PREFIX)
    b = LeaseClient(client, "b", ttl_s=30, prefix=PREFIX)
    await a.heartbeat([])
    [lease] = await a.acquire_many(["src"])
    assert await client.pttl(lease.keys.lease) == -1  # no TTL of its own: the membership's
    assert await b.acquire_many(["src"]) == []
    assert b.free_in_s is not None
    assert 0 < b.free_in_s <= 30
    await client.zadd(replicas_key(PREFIX), {"a": 0})  # a's membership expired
    [taken] = await b.acquire_many(["src"])
    assert taken.fence > lease.fence
