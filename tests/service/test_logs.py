"""What the service logs by default: no line per HTTP request (httpx/httpcore at INFO are
shown only at DEBUG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.httpserver import Documents

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
