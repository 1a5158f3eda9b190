"""The service's schedule under load: polls and publishes in flight are bounded by
``max_concurrent_polls`` (a shared slot per step), the lag of each poll is measured, and each
source starts at its own phase."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from bridge.errors import ConfigError
from bridge.events import ExternalEvent
from bridge.service.config import parse_config
from bridge.service.delivery import SourceLoop, SourceSpec
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from bridge.state import MemoryStateStore
from bridge.watching import Lag, WatchConfig, start_offset_s


class Gated:
    """A source whose polls wait for a gate; counts the polls in flight."""

    def __init__(self, name: str, shared: dict[str, int], gate: asyncio.Event) -> None:
        self.name = name
        self.shared = shared
        self.gate = gate

    async def poll(self) -> Sequence[ExternalEvent[Any]]:
        self.shared["in_flight"] += 1
        self.shared["most"] = max(self.shared["most"], self.shared["in_flight"])
        try:
            await self.gate.wait()
        finally:
            self.shared["in_flight"] -= 1
            self.shared["polls"] += 1
        return []


async def test_steps_in_flight_are_bounded_by_the_shared_slots() -> None:
    shared = {"in_flight": 0, "most": 0, "polls": 0}
    gate = asyncio.Event()
    slots = asyncio.Semaphore(2)
    lags: list[float] = []
    lag = Lag(lags.append)
    loops = [
        SourceLoop(
            SourceSpec(
                name=f"s{i}",
                source=Gated(f"s{i}", shared, gate),
                watch=WatchConfig(3600),
                source_uri="test://s",
            ),
            MemorySink(),
            MemoryStateStore(),
            slots=slots,
            lag=lag,
        )
        for i in range(5)
    ]
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    try:
        for _ in range(20):  # every loop gets to run up to its slot
            await asyncio.sleep(0)
        assert shared["in_flight"] == 2
        gate.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*(loop.wait_for_steps(1) for loop in loops))
        assert shared["most"] == 2
        assert shared["polls"] == 5
        assert len(lags) == 5  # each poll's lag observed, waiting for a slot included
    finally:
        for loop in loops:
            loop.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def config(**top: Any) -> dict[str, Any]:
    return {
        "broker": {"url": "nats://127.0.0.1:1"},
        "sources": [{"name": f"s{i}", "interval": 30, "local": {"path": "/tmp"}} for i in range(3)],
        **top,
    }


async def test_the_service_shares_its_slots_and_starts_sources_at_their_phase() -> None:
    bridge = Bridge(parse_config(config(max_concurrent_polls=7), env={}), sink=MemorySink())
    assert bridge.config.max_concurrent_polls == 7
    for spec in bridge.specs:
        bridge._start_source(spec)
    try:
        for name, loop in bridge.loops.items():
            assert loop.slots is bridge.slots
            assert loop.offset_s == start_offset_s(name, 30.0, 3)
            assert loop.spec.watch.retry_jitter == 1.0  # the service's retries are jittered
    finally:
        await bridge._shutdown(bridge._tasks)
    default = parse_config(config(), env={})
    assert default.max_concurrent_polls == 256


def test_max_concurrent_polls_must_be_a_positive_integer() -> None:
    with pytest.raises(ConfigError, match="max_concurrent_polls: must be an integer >= 1"):
        parse_config(config(max_concurrent_polls=0), env={})
