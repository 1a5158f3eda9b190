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
    tail: asyncio.subprocess.Process | None = None
    try:
        follow = await _line_containing(process.stdout, "follow", seen)
        await _line_containing(process.stdout, "events (kind", seen)
        assert inbox.is_dir()
        assert str(home.absolute()) in "".join(seen)
        assert "koprs-bridge init" in "".join(seen)
        # the banner's own command follows the events from another process
        command = follow.split("follow", 1)[1].split("(in another terminal)")[0].split()
        assert command[:2] == ["koprs-bridge", "tail"], follow
        tail = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            *command[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        (inbox / "hello.txt").write_text("hi")
        added = await _line_containing(process.stdout, "hello.txt", seen)
        assert added.startswith("added")
        assert tail.stdout is not None
        tailed: list[str] = []
        followed = await asyncio.wait_for(_line_containing(tail.stdout, "hello.txt", tailed), 60)
        assert "added" in followed
        (inbox / "hello.txt").unlink()
        removed = await _line_containing(process.stdout, "hello.txt", seen)
        assert removed.startswith("removed")
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        for child in (tail, process):
            if child is not None and child.returncode is None:
                child.kill()
                await child.wait()
    assert (home / "nats").is_dir()
    assert not any("Traceback" in line for line in seen), seen


def test_banner_says_when_the_default_port_was_taken(tmp_path: Path) -> None:
    from bridge.service.embedded import banner

    assert "was taken" not in banner("nats://127.0.0.1:4222", tmp_path, tmp_path)
    moved = banner("nats://127.0.0.1:40001", tmp_path, tmp_path)
    assert "(port 4222 was taken)" in moved
    assert "koprs-bridge tail --broker nats://127.0.0.1:40001 --from-start" in moved
