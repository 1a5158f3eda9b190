"""One state folder, one process; and a warning when state lives in memory (issue 12, item 4)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.errors import StateError
from bridge.secrets import Secret
from bridge.service.config import (
    BridgeConfig,
    BrokerConfig,
    LocalSourceConfig,
    SourceConfig,
    StateConfig,
)
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from bridge.state.files import LOCK_FILE, FileStateStore
from bridge.state.recovery import Published

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys
from bridge.state.files import FileStateStore
store = FileStateStore(sys.argv[1], exclusive=True)
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def child_env() -> dict[str, str]:
    """This worktree's code first on the path (not an installed copy)."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def test_a_second_open_of_a_locked_folder_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    first = FileStateStore(tmp_path / "state", exclusive=True)
    with pytest.raises(StateError) as refused:
        FileStateStore(tmp_path / "state", exclusive=True)
    message = str(refused.value)
    assert str(tmp_path / "state") in message
    assert "in use" in message
    assert f"pid {os.getpid()}" in message
    await first.aclose()
    second = FileStateStore(tmp_path / "state", exclusive=True)  # released: taken again
    await second.aclose()


def test_a_folder_held_by_another_process_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(StateError, match=f"another process \\(pid {holder.pid}\\)"):
            FileStateStore(folder, exclusive=True)
        # the service refuses to start, with that message (exit status 1, no traceback)
        source = tmp_path / "files"
        source.mkdir()
        config = tmp_path / "bridge.yaml"
        config.write_text(
            "broker: {url: 'nats://127.0.0.1:1'}\n"
            f"state: {{path: '{folder}'}}\n"
            f"sources: [{{name: files, interval: 1h, local: {{path: '{source}'}}}}]\n"
        )
        run = subprocess.run(
            [sys.executable, "-m", "bridge", "run", "--config", str(config)],
            capture_output=True,
            env=child_env(),
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 1, run.stderr
        assert f"state folder {str(folder)!r} is in use" in run.stderr
        assert "Traceback" not in run.stderr
    finally:
        holder.communicate("", timeout=30)  # the holder exits: the kernel drops its lock
    store = FileStateStore(folder, exclusive=True)
    assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    asyncio.run(store.aclose())


async def test_a_plain_store_does_not_lock(tmp_path: Path) -> None:
    """Without ``exclusive`` (the library's default: tests, tools reading a journal)."""
    locked = FileStateStore(tmp_path, exclusive=True)
    reader = FileStateStore(tmp_path)
    assert await reader.load("s") is None
    await locked.aclose()


def config(tmp_path: Path, state_path: Path | None) -> BridgeConfig:
    source = tmp_path / "files"
    source.mkdir(exist_ok=True)
    return BridgeConfig(
        broker=BrokerConfig(url=Secret.inline("nats://127.0.0.1:1")),
        state=None if state_path is None else StateConfig(path=state_path),
        sources=(
            SourceConfig(name="files", interval_s=3600, local=LocalSourceConfig(path=source)),
        ),
    )


@pytest.mark.parametrize("state", ["memory", "folder"])
async def test_memory_state_is_announced_at_start(
    tmp_path: Path, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    state_path = tmp_path / "state" if state == "folder" else None
    bridge = Bridge(config(tmp_path, state_path), sink=MemorySink(), shutdown_grace_s=0.01)
    stop = asyncio.Event()
    stop.set()  # start, then stop at once
    with caplog.at_level(logging.WARNING, "bridge.service"):
        await bridge.run(stop)
    warnings = [r.getMessage() for r in caplog.records if "in memory" in r.getMessage()]
    if state == "memory":
        assert warnings == [
            "source state is kept in memory only (no state.path): a restart publishes every "
            "item again as Added, under new event ids; set state.path to keep it"
        ]
    else:
        assert warnings == []
        FileStateStore(tmp_path / "state", exclusive=True)  # released at shutdown


async def test_memory_state_with_a_broker_that_recovers_is_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink that can tell what it holds (bridge.state.recovery) makes memory state safe: each
    start rebuilds it from the broker, so the notice is information, not a warning."""
    bridge = Bridge(config(tmp_path, None), sink=RecoveringSink(), shutdown_grace_s=0.01)
    stop = asyncio.Event()
    stop.set()
    with caplog.at_level(logging.INFO, "bridge.service"):
        await bridge.run(stop)
    notices = [r for r in caplog.records if "in memory" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in notices] == [
        (
            logging.INFO,
            "source state is kept in memory only (no state.path): each start rebuilds it from "
            "what memory://memory holds (recovery from the broker)",
        )
    ]


class RecoveringSink(MemorySink):
    async def read_published(self, source_name: str) -> Published:
        return Published()
