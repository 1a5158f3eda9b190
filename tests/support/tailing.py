"""``koprs-bridge tail`` as a subprocess: :func:`tail` (follow its output while it runs) and
:func:`run_to_end` (a tail command that ends by itself)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class Tail:
    """A running ``koprs-bridge tail``."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr: list[str] = []

    async def wait_ready(self) -> None:
        """Until it says it follows the broker (its subscription is in place)."""
        assert self.process.stderr is not None
        async with asyncio.timeout(30):
            while True:
                raw = await self.process.stderr.readline()
                if not raw:
                    pytest.fail(f"tail exited before it was ready: {''.join(self.stderr)}")
                self.stderr.append(raw.decode())
                if "koprs-bridge tail: following" in self.stderr[-1]:
                    return

    async def line(self) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            raw = await self.process.stdout.readline()
        assert raw, f"tail ended early: {await self.rest_of_stderr()}"
        return raw.decode().rstrip("\n")

    async def lines(self, count: int) -> list[str]:
        return [await self.line() for _ in range(count)]

    async def rest_of_stderr(self) -> str:
        assert self.process.stderr is not None
        return "".join(self.stderr) + (await self.process.stderr.read()).decode()

    async def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: the exit status and what was left on stdout."""
        self.process.send_signal(signal.SIGINT)
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            rest = await self.process.stdout.read()
            code = await self.process.wait()
        return code, rest.decode()


@contextlib.asynccontextmanager
async def tail(*args: str) -> AsyncIterator[Tail]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "tail",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        yield Tail(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def run_to_end(*args: str) -> tuple[int, str, str]:
    """Run a tail command that is expected to end by itself."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "bridge", "tail", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr
