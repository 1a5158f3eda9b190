"""Leases, fenced checkpoints and fair sharing against a real redis-server (in one process;
tests/ha/test_ha_processes.py runs replicas as separate processes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.errors import FencedError
from bridge.ha.checkpoints import RedisStateStore
from bridge.ha.keys import SourceKeys
from bridge.ha.leases import LeaseClient
from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from bridge.state import Intent

PREFIX = "koprs:bridge:"


async def test_lease_is_exclusive_fenced_renewable_and_released(
    redis_client: aioredis.Redis,
) -> None:
    a = LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX)
    b = LeaseClient(redis_client, "b", ttl_s=5, prefix=PREFIX)
    lease = await a.acquire("src")
    assert lease is not None
    assert await b.acquire("src") is None  # losing the race is a normal outcome
    assert b.free_in_s is not None
    assert 0 < b.free_in_s <= 5  # when the holder's lease runs out, unless renewed
    assert await a.renew(lease)
    assert lease.valid()
    await a.release(lease)
    again = await b.acquire("src")
    assert again is not None
    assert again.fence > lease.fence  # a new fencing token per acquisition
    assert not await a.renew(lease)  # the old holder's renewal is refused
    assert lease.lost.is_set()
    await a.release(lease)  # compare-and-delete: does not remove b's lease
    assert await redis_client.get(SourceKeys("src", PREFIX).lease) == again.token.encode()


async def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced(
    redis_client: aioredis.Redis,
) -> None:
    a = LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX)
    b = LeaseClient(redis_client, "b", ttl_s=5, prefix=PREFIX)
    old = await a.acquire("src")
    assert old is not None
    old_store = RedisStateStore(redis_client, {"src": old})
    await old_store.commit("src", 1, {"k": "v1"})
    await redis_client.delete(SourceKeys("src", PREFIX).lease)  # as if the TTL ran out
    new = await b.acquire("src")
    assert new is not None
    new_store = RedisStateStore(redis_client, {"src": new})
    await new_store.commit("src", 2, {"k": "v2"})
    old.deadline = float("inf")  # even a replica that believes it still holds the lease...
    with pytest.raises(FencedError):
        await old_store.commit("src", 2, {"k": "stale"})  # ...cannot overwrite the new state
    with pytest.raises(FencedError):
        await old_store.begin("src", Intent(3, {}))
    checkpoint = await new_store.load("src")
    assert checkpoint is not None
    assert (checkpoint.revision, checkpoint.state) == (2, {"k": "v2"})


async def test_commits_are_incremental_and_intents_round_trip(redis_client: aioredis.Redis) -> None:
    lease = await LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX).acquire("src")
    assert lease is not None
    store = RedisStateStore(redis_client, {"src": lease})
    await store.commit("src", 1, {f"obj{i}": f"e{i}" for i in range(2500)})
    keys = SourceKeys("src", PREFIX)
    await redis_client.hset(keys.state, "untouched", "sentinel")  # a commit must not rewrite it
    await store.commit("src", 2, {"obj1": "changed", "obj2": None})
    assert await redis_client.hget(keys.state, "untouched") == b"sentinel"
    checkpoint = await store.load("src")
    assert checkpoint is not None
    assert checkpoint.revision == 2
    assert len(checkpoint.state) == 2500  # 2500 - 1 removed + the sentinel
    assert checkpoint.state["obj1"] == "changed"
    assert "obj2" not in checkpoint.state
    assert checkpoint.intent is None
    await store.begin("src", Intent(3, {"obj3": "next"}))
    loaded = await store.load("src")
    assert loaded is not None
    assert loaded.intent == Intent(3, {"obj3": "next"})
    await store.commit("src", 2, {"obj3": "next"}, next_intent=Intent(3, {"obj4": None}))
    loaded = await store.load("src")
    assert loaded is not None
    assert (loaded.revision, loaded.state["obj3"], loaded.intent) == (
        2,
        "next",
        Intent(3, {"obj4": None}),
    )
    await store.commit("src", 3, {"obj4": None})
    loaded = await store.load("src")
    assert loaded is not None
    assert (loaded.revision, loaded.intent) == (3, None)


async def test_foreign_checkpoint_version_is_reported_and_resynced(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    keys = SourceKeys("files", PREFIX)
    await redis_client.hset(keys.meta, mapping={"format": "99", "revision": "7"})
    await redis_client.hset(keys.state, mapping={"ghost": "x"})
    (tmp_path / "a").write_text("1")
    async with elected_bridges(redis_client, tmp_path, ["files"], ["r1"]) as (bridges, sinks):
        await sinks[0].wait_for(1, "files")
        await settled(bridges)
    assert [e.subject for e in sinks[0].events("files")] == ["a"]
    assert await redis_client.hget(keys.state, "ghost") is None
    assert await redis_client.hget(keys.meta, "format") == b"1"


def config(tmp_path: Path, names: list[str], redis_url: str) -> dict[str, Any]:
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
    return {
        "broker": {"url": "nats://127.0.0.1:1"},
        "leader_election": {"redis_url": redis_url, "lease_ttl": 2, "renew_every": 0.1},
        "sources": [
            {
                "name": n,
                "interval": 0.05,
                "local": {"path": str(tmp_path / n if len(names) > 1 else tmp_path)},
            }
            for n in names
        ],
    }


@contextlib.asynccontextmanager
async def elected_bridges(
    redis_client: aioredis.Redis, tmp_path: Path, names: list[str], replicas: list[str]
) -> AsyncIterator[tuple[list[Bridge], list[MemorySink]]]:
    raw = config(tmp_path, names, redis_client.url)  # type: ignore[attr-defined]
    sinks = [MemorySink(r) for r in replicas]
    bridges = [
        Bridge(parse_config(raw, env={}), sink=s, replica=r, shutdown_grace_s=1)
        for s, r in zip(sinks, replicas, strict=True)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(b.run(stop)) for b in bridges]
    try:
        yield bridges, sinks
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def settled(bridges: list[Bridge], rounds: int = 3) -> None:
    for bridge in bridges:
        assert bridge.coordinator is not None
        await bridge.coordinator.wait_for_rounds(bridge.coordinator.rounds + rounds)


async def test_sources_spread_evenly_when_replicas_join(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    names = [f"s{i:02}" for i in range(12)]
    async with elected_bridges(redis_client, tmp_path, names, ["r1"]) as (first, _):
        await settled(first)
        assert first[0].coordinator is not None
        assert len(first[0].coordinator.led) == 12
        async with elected_bridges(redis_client, tmp_path, names, ["r2", "r3"]) as (more, _):
            everyone = first + more
            for _ in range(50):
                await settled(everyone, 1)
                counts = sorted(len(b.coordinator.led) for b in everyone if b.coordinator)
                if counts == [4, 4, 4]:
                    break
            assert counts == [4, 4, 4]
            led = [set(b.coordinator.led) for b in everyone if b.coordinator]
            assert set().union(*led) == set(names)  # every source led, none twice


async def test_status_command_shows_who_leads_what(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    import json
    import sys

    import yaml

    names = ["alpha", "beta"]
    async with elected_bridges(redis_client, tmp_path, names, ["r1"]) as (bridges, _):
        await settled(bridges)
        path = tmp_path / "bridge.yaml"
        path.write_text(yaml.safe_dump(config(tmp_path, names, redis_client.url)))  # type: ignore[attr-defined]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "status",
            "--config",
            str(path),
            "--json",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
    assert process.returncode == 0
    status = json.loads(out)
    assert status["replicas"] == ["r1"]
    assert {n: s["holder"] for n, s in status["sources"].items()} == {"alpha": "r1", "beta": "r1"}


async def test_a_replica_short_of_its_share_comes_back_as_a_held_lease_expires(
    redis_client: aioredis.Redis,
) -> None:
    """Failover within the TTL: the next round is due when the lease it could not take runs
    out, not a whole election period later."""
    from bridge import MemoryStore, ObjectStorePoller
    from bridge.ha.sharing import Coordinator
    from bridge.service.delivery import SourceSpec
    from bridge.sinks.memory import MemorySink
    from bridge.watching import WatchConfig

    holder = await LeaseClient(redis_client, "a", ttl_s=5, prefix=PREFIX).acquire("src")
    assert holder is not None
    spec = SourceSpec(
        name="src",
        source=ObjectStorePoller(MemoryStore()).with_name("src"),
        watch=WatchConfig(1),
        source_uri="memory://t",
    )
    coordinator = Coordinator(
        [spec], MemorySink(), redis_client, replica="b", lease_ttl_s=5, renew_every_s=4,
        prefix=PREFIX,
    )  # fmt: skip
    await redis_client.pexpire(holder.keys.lease, 1000)  # its holder died 4 s ago
    await coordinator.round()
    assert coordinator.led == {}
    assert coordinator._retry_in_s is not None
    assert 0 < coordinator._retry_in_s <= 1.0  # when that lease runs out, not in 4 s
    await redis_client.delete(holder.keys.lease)  # it ran out
    await coordinator.round()
    assert set(coordinator.led) == {"src"}
    assert coordinator._retry_in_s is None
    stop = asyncio.Event()
    stop.set()
    await coordinator.run(stop)  # stops the led source and releases its lease
    assert coordinator.led == {}
