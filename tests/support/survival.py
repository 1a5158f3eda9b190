"""A service with one bad source beside a healthy one, and what it must survive.

:func:`service` runs a bridge (memory sink) with the bad source and a healthy HTTP document;
:func:`assert_survives` checks a bad source the way every bad-input test does: a clear log
line naming it, error metrics, the exact backoff delays, no crash, and the healthy source
delivering everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.service.config import parse_config
from bridge.service.delivery import SourceLoop
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from tests.support.httpserver import Documents, version_of
from tests.support.servers import LOOPBACK

INTERVAL_S = 0.05
MAX_BACKOFF_S = 0.2
FAILURES = 3
"""Failures in a row every bad source must show (their delays: 0.1, 0.2, then 0.2 s: the
ceiling)."""
WAIT_S = 30.0
"""Bound of every wait on a condition (generous: only a broken bridge reaches it)."""


# -- the service with a bad source and a healthy one -------------------------------------------


class NoJitter(random.Random):
    """Ticks exactly on their grid and backoff delays at their ceiling."""

    def random(self) -> float:
        return 0.0


@dataclass
class Service:
    bridge: Bridge
    sink: MemorySink
    task: asyncio.Task[None]
    docs: Documents

    async def loop(self, name: str) -> SourceLoop:
        """The source's loop, once the service started it."""
        async with asyncio.timeout(WAIT_S):
            await self.bridge.started.wait()
        return self.bridge.loops[name]

    def metric(self, name: str, **labels: str) -> float:
        value = self.bridge.telemetry.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def healthy_delivers_every_change(self) -> list[str]:
        """Change the healthy document twice, each change awaited at the sink; its versions."""
        versions = [version_of(b'{"v": 1}')]
        await self.sink_has("healthy", 1)
        for n in (2, 3):
            versions.append(str(self.docs.set("healthy", f'{{"v": {n}}}'.encode())))
            await self.sink_has("healthy", n)
        return versions

    async def sink_has(self, source: str, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            await self.sink.wait_for(count, source)


def bad_http(url: str, **http: Any) -> dict[str, Any]:
    return {
        "name": "bad",
        "interval": INTERVAL_S,
        "max_backoff": MAX_BACKOFF_S,
        "http": {"url": url, **http},
    }


def bad_s3(endpoint_url: str, bucket: str = "bucket") -> dict[str, Any]:
    return {
        "name": "bad",
        "interval": INTERVAL_S,
        "max_backoff": MAX_BACKOFF_S,
        "s3": {
            "bucket": bucket,
            "prefix": "cfg/",
            "endpoint_url": endpoint_url,
            "region": "us-east-1",
            "access_key_id": "testing",
            "secret_access_key": "testing",
        },
    }


@contextlib.asynccontextmanager
async def service(bad: dict[str, Any]) -> AsyncIterator[Service]:
    """A bridge running the ``bad`` source and a healthy HTTP document (``{"v": 1}``)."""
    with Documents() as docs:
        docs.set("healthy", b'{"v": 1}')
        healthy = {"name": "healthy", "interval": INTERVAL_S, "http": {"url": docs.url("healthy")}}
        raw = {"broker": {"url": f"nats://{LOOPBACK}:9"}, "sources": [bad, healthy]}
        sink = MemorySink()
        # Pinned randomness: the service's retries have full jitter, these delays are exact.
        bridge = Bridge(parse_config(raw, env={}), sink=sink, shutdown_grace_s=1, rng=NoJitter())
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        try:
            yield Service(bridge, sink, task, docs)
        finally:
            stop.set()
            async with asyncio.timeout(WAIT_S):
                await task


def poll_failures(caplog: pytest.LogCaptureFixture, source: str) -> list[logging.LogRecord]:
    """The engine's log records of failed polls of ``source``, in order."""
    return [
        r
        for r in caplog.records
        if r.name == "bridge.watch"
        and str(r.msg).startswith("poll of source %r failed")
        and isinstance(r.args, tuple)
        and r.args[0] == source
    ]


def expected_delays(failures: int) -> list[float]:
    return [min(INTERVAL_S * 2**n, MAX_BACKOFF_S) for n in range(1, failures + 1)]


async def assert_survives(
    run: Service, caplog: pytest.LogCaptureFixture, *, where: str, problem: str
) -> None:
    """The assertions every bad source must pass (see the module docstring)."""
    bad = await run.loop("bad")
    versions = await run.healthy_delivers_every_change()
    async with asyncio.timeout(WAIT_S):
        await bad.wait_for_steps(FAILURES)

    assert not run.task.done(), "the service stopped"
    records = poll_failures(caplog, "bad")[:FAILURES]
    assert len(records) == FAILURES
    for record in records:
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert "'bad'" in message, message
        assert where in message, message
        assert problem in message, message
    assert [r.args[1] for r in records] == list(range(1, FAILURES + 1))  # type: ignore[index]
    delays = [r.args[2] for r in records]  # type: ignore[index]
    assert delays == pytest.approx(expected_delays(FAILURES)), "no exponential backoff"
    assert run.metric("koprs_bridge_poll_errors_total", source="bad") >= FAILURES
    assert run.metric("koprs_bridge_poll_consecutive_failures", source="bad") >= FAILURES
    assert run.metric("koprs_bridge_poll_errors_total", source="healthy") == 0

    published = run.sink.published["healthy"]
    assert [(e.type.split(".")[-2], e.data["digest"]) for e in published] == [
        ("added", versions[0]),
        ("modified", versions[1]),
        ("modified", versions[2]),
    ]
    assert "bad" not in run.sink.published
    steps = bad.steps
    async with asyncio.timeout(WAIT_S):  # still polling (backing off), not stuck
        await bad.wait_for_steps(steps + 1)


# -- HTTP --------------------------------------------------------------------------------------
