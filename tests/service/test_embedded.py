"""`koprs-bridge run` with no config: embedded NATS, a watched folder, events printed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.servers


async def _line_containing(stream: asyncio.StreamReader, text: str, seen: list[str]) -> str:
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError(f"output ended before {text!r}; got: {seen}")
        line = raw.decode()
        seen.append(line)
        if text in line:
            return line


async def test_run_without_config_prints_events_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    inbox, home = tmp_path / "inbox", tmp_path / "home"
    env = {**os.environ, "KOPRS_BRIDGE_CONFIG": ""}
    env.pop("KOPRS_BRIDGE_CONFIG")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "--log-level",
        "warning",
        "run",
        "--inbox",
        str(inbox),
        "--home",
        str(home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        await _line_containing(process.stdout, "watching", seen)
        assert inbox.is_dir()
        (inbox / "hello.txt").write_text("hi")
        added = await _line_containing(process.stdout, "hello.txt", seen)
        assert added.startswith("added")
        (inbox / "hello.txt").unlink()
        removed = await _line_containing(process.stdout, "hello.txt", seen)
        assert removed.startswith("removed")
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert (home / "nats").is_dir()
    assert not any("Traceback" in line for line in seen), seen
