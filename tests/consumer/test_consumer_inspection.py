"""``koprs-bridge tail --stats`` and ``tail --dead-letters`` on both brokers, after a handler
dead-lettered a poison event."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bridge.consumer import Delivery, EventHandler, Synced, run_handler
from tests.support.consumers import Backend, backend, events
from tests.support.replicas import until
from tests.support.tailing import run_to_end, tail

pytestmark = pytest.mark.servers
__all__ = ["backend"]  # the fixture, shared with the contract suite


class Poisoned(EventHandler[None]):
    def __init__(self) -> None:
        self.synced = asyncio.Event()

    async def handle_synced(self, synced: Synced, state: None) -> None:
        self.synced.set()

    async def handle_delivery(self, delivery: Delivery, state: None) -> None:
        if delivery.envelope.key == "b":
            raise ValueError("cannot handle b")


async def dead_letter_b(backend: Backend) -> None:
    handler = Poisoned()
    watch = backend.watch(durable="ops", max_deliveries=1)
    task = asyncio.create_task(run_handler(handler, watch))
    try:
        async with asyncio.timeout(15):
            await handler.synced.wait()
        await backend.publish(events(["a", "b"]))

        async def written() -> bool:
            return bool(await backend.dead_letters())

        await until(written, "the dead letter")
        await until(lambda: _settled(backend), "everything settled")
    finally:
        await watch.aclose()
        async with asyncio.timeout(10):
            await task


async def _settled(backend: Backend) -> bool:
    return await backend.unsettled("ops") == 0


def broker_args(backend: Backend) -> list[str]:
    args = ["--broker", backend.url]
    if backend.kind == "nats":
        args += ["--subject-prefix", backend.subject_prefix]
    return args


async def test_stats_show_the_consumers_lag_and_dead_letters(backend: Backend) -> None:
    await dead_letter_b(backend)
    code, out, err = await asyncio.to_thread(run_to_end, *broker_args(backend), "--stats", "--json")
    assert code == 0, err
    stats: dict[str, Any] = json.loads(out)
    if backend.kind == "nats":
        assert stats["stream"] == backend.stream
        [ops] = [c for c in stats["consumers"] if c["name"] == "ops"]
        assert ops["durable"] is True
        assert (ops["pending"], ops["unacknowledged"], ops["lag"]) == (0, 0, 0)
        assert stats["dead_letters"] == {"stream": f"{backend.stream}_DEADLETTER", "count": 1}
    else:
        [files] = stats["sources"]
        assert files["source"] == "files"
        assert files["entries"] == 2
        [ops] = files["groups"]
        assert (ops["name"], ops["pending"], ops["lag"]) == ("ops", 0, 0)
        assert files["dead_letters"] == {"stream": "koprs:deadletter:files", "count": 1}

    code, text, err = await asyncio.to_thread(run_to_end, *broker_args(backend), "--stats")
    assert code == 0, err
    assert "ops" in text
    assert "dead letters: 1" in text


async def test_dead_letters_are_followed(backend: Backend) -> None:
    await dead_letter_b(backend)
    async with tail(*broker_args(backend), "--dead-letters", "--json") as running:
        await running.wait_ready()
        letter = json.loads(await running.line())
        code, _rest = await running.interrupt()
    assert code == 0
    assert (letter["source_name"], letter["key"], letter["kind"]) == ("files", "b", "added")
    assert letter["error"] == "ValueError: cannot handle b"
    assert letter["deliveries"] == 1
    assert "ops" in letter["consumer"]
