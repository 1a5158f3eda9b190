"""What the service logs by default: no line per HTTP request (httpx/httpcore at INFO are
shown only at DEBUG); a source that works again after failures says so once, with how many
attempts failed and for how long."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from bridge.events import Added
from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from bridge.watching import WatchConfig, watch_external_with_config
from tests.support.httpserver import Documents, Exchange, HttpTestServer, Reply

REPO = Path(__file__).resolve().parents[2]


def run_polling(tmp_path: Path, nats_url: str, level: str) -> str:
    """``koprs-bridge run`` polling a document until it was asked 5 times; its stderr."""
    tag = uuid.uuid4().hex[:10]
    with Documents() as docs:
        docs.set("doc.json", b'{"v": 1}')
        config = tmp_path / "bridge.yaml"
        config.write_text(
            f"broker: {{url: {nats_url}, stream: T{tag}, subject_prefix: t{tag}.external}}\n"
            f"sources:\n  - {{name: doc, interval: 0.05, http: {{url: {docs.url('doc.json')}}}}}\n"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("KOPRS_BRIDGE_LOG_LEVEL", None)
        args = [sys.executable, "-m", "bridge", "run", "--config", str(config)]
        if level != "default":
            args += ["--log-level", level]
        process = subprocess.Popen(
            args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        try:
            deadline = time.monotonic() + 60
            while len(docs.requests("doc.json")) < 5:  # the server runs in a thread of ours
                assert time.monotonic() < deadline, "the bridge did not poll 5 times"
                assert process.poll() is None, "the bridge exited"
                time.sleep(0.02)
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    return stderr


@pytest.mark.parametrize("level", ["default", "info"])
def test_no_line_per_http_request_by_default(tmp_path: Path, nats_url: str, level: str) -> None:
    stderr = run_polling(tmp_path, nats_url, level)
    assert "HTTP Request" not in stderr
    assert "httpx" not in stderr


def test_debug_shows_the_requests(tmp_path: Path, nats_url: str) -> None:
    stderr = run_polling(tmp_path, nats_url, "debug")
    assert "HTTP Request: GET" in stderr


def recoveries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]


class FailsThenWorks:
    """A source whose first ``failures`` polls raise; then each poll has one event."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.left = failures

    async def poll(self) -> list[Any]:
        if self.left:
            self.left -= 1
            raise RuntimeError("not yet")
        return [Added("thing")]


async def test_the_library_watch_logs_one_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bridge")
    watch = watch_external_with_config(FailsThenWorks(3), WatchConfig(0.001, 0.002))
    async with asyncio.timeout(30):
        assert await anext(watch) == Added("thing")
        assert await anext(watch) == Added("thing")  # a success after a success: no line
    await watch.aclose()
    [line] = recoveries(caplog)
    assert "'flaky' recovered" in line
    assert "after 3 failed attempt(s)" in line


async def test_the_service_logs_one_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bridge")
    answers = iter([500, 500, 200])

    def flaky(exchange: Exchange) -> Reply:
        status = next(answers, 200)
        return Reply(status, b'{"v": 1}' if status == 200 else b"")

    with HttpTestServer() as server:
        url = server.route("/doc.json", flaky)
        source = {"name": "doc", "interval": 0.05, "max_backoff": 0.1, "http": {"url": url}}
        config = parse_config(
            {"broker": {"url": "nats://127.0.0.1:9"}, "sources": [source]}, env={}
        )
        sink = MemorySink()
        bridge = Bridge(config, sink=sink, shutdown_grace_s=1)
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        try:
            async with asyncio.timeout(30):
                await sink.wait_for(1, "doc")
                loop = bridge.loops["doc"]
                await loop.wait_for_steps(loop.steps + 2)  # polls on, succeeding
        finally:
            stop.set()
            await task
    [line] = recoveries(caplog)
    assert "'doc' recovered" in line
    assert "after 2 failed attempt(s)" in line
