"""Every Python block of the README runs, as written, against real servers.

Each ```` ```python ```` block is a complete program. This test writes it to a file, runs it
with ``python`` in a subprocess whose environment points the block's ``os.environ.get(...)``
settings at servers on 127.0.0.1 (an HTTP document server, nats-server, a bridge publishing to
it), and waits for the lines the program prints. A block this test does not know fails: a new
example in the README needs a scenario here, so the docs cannot drift from the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from tests.support.httpserver import Documents
from tests.support.receiving import fresh_nats

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Block:
    line: int
    code: str

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def blocks() -> list[Block]:
    text = README.read_text()
    return [Block(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without proxies (loopback only), plus the block's settings."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"  # lines as they are printed, not when a pipe buffer fills
    return {**env, **extra}


Step = str | tuple[str, Callable[[], Awaitable[None]]]
"""A line to wait for, optionally with what to do once it was printed."""


async def run_block(
    block: Block, tmp_path: Path, env: dict[str, str], expect: Sequence[Step]
) -> str:
    """Run ``block`` until it printed every line of ``expect`` (in order), doing each step's
    action once its line was printed; then stop it."""
    program = tmp_path / f"readme_{block.line}.py"
    program.write_text(block.code)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(program),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    seen: list[str] = []
    wanted = [(step, None) if isinstance(step, str) else step for step in expect]
    try:
        async with asyncio.timeout(DEADLINE_S):
            while wanted:
                raw = await process.stdout.readline()
                if not raw:
                    break
                seen.append(raw.decode())
                if wanted[0][0] in seen[-1]:
                    _, action = wanted.pop(0)
                    if action is not None:
                        await action()
    except TimeoutError:
        pass
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
    output = "".join(seen)
    assert not wanted, f"{block} never printed {wanted[0][0]!r}; it printed:\n{output}"
    assert "Traceback" not in output, f"{block}:\n{output}"
    return output


# -- one scenario per block, recognised by a line of its code ---------------------------------

Scenario = Callable[[Block, Path, pytest.FixtureRequest], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(marker: str) -> Callable[[Scenario], Scenario]:
    def register(function: Scenario) -> Scenario:
        SCENARIOS[marker] = function
        return function

    return register


@scenario('URL = os.environ.get("APP_URL"')
async def library_watch(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with Documents() as docs:
        docs.set("app.json", b'{"replicas": 3}')
        env = clean_env(APP_URL=docs.url("app.json"))
        await run_block(block, tmp_path, env, ["now 200 15 bytes"])
        assert docs.requests("app.json"), "the program never asked the server"


@scenario('RELEASES = os.environ.get("RELEASES_URL"')
async def own_source(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with Documents() as docs:
        docs.set("releases.json", json.dumps({"v1.0": "3f2a", "v1.1": "9c01"}).encode())
        env = clean_env(RELEASES_URL=docs.url("releases.json"))
        await run_block(block, tmp_path, env, ["Added v1.0 3f2a", "Added v1.1 9c01"])


@contextlib.asynccontextmanager
async def bridge_publishing(nats_url: str, folder: Path) -> AsyncIterator[None]:
    """A bridge publishing the folder as source ``app-config`` to the default stream."""
    await fresh_nats(nats_url)  # the examples use the default stream and subjects
    published = asyncio.Event()
    config = parse_config(
        {
            "broker": {"url": nats_url},
            "sources": [{"name": "app-config", "interval": 0.05, "local": {"path": str(folder)}}],
        },
        env={},
    )
    bridge = Bridge(config, on_published=lambda _source, _events: published.set())
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        async with asyncio.timeout(DEADLINE_S):
            await published.wait()  # the stream exists and holds the folder's first file
        yield
    finally:
        stop.set()
        await task


@scenario('NATS_URL = os.environ.get("NATS_URL", "nats://nats:4222")')
async def consumer_with_a_reflector(
    block: Block, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    nats_url: str = request.getfixturevalue("nats_url")
    folder = tmp_path / "app-config"
    folder.mkdir()
    (folder / "a.json").write_text("{}")

    async def change() -> None:
        (folder / "b.json").write_text("{}")

    async def delete() -> None:
        (folder / "a.json").unlink()

    async with bridge_publishing(nats_url, folder):
        env = clean_env(NATS_URL=nats_url)
        steps: list[Step] = [
            "apply a.json",  # the initial list, then the marker
            ("synced: 1 items", change),
            ("apply b.json", delete),
            "forget a.json",
        ]
        await run_block(block, tmp_path, env, steps)


@scenario('broker = NatsBroker(os.environ.get("NATS_URL"')
async def faststream_app(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    nats_url: str = request.getfixturevalue("nats_url")
    folder = tmp_path / "app-config"
    folder.mkdir()
    (folder / "a.json").write_text("{}")

    async def delete() -> None:
        (folder / "a.json").unlink()

    async with bridge_publishing(nats_url, folder):
        env = clean_env(NATS_URL=nats_url)
        await run_block(block, tmp_path, env, [("changed a.json", delete), "removed a.json"])


def scenario_of(block: Block) -> Scenario:
    found = [run for marker, run in SCENARIOS.items() if marker in block.code]
    assert len(found) == 1, (
        f"{block}: {len(found)} scenarios in tests/service/test_readme.py match this block; "
        "every README Python block needs exactly one (a line of its code as the marker)"
    )
    return found[0]


@pytest.mark.parametrize("block", blocks(), ids=str)
async def test_readme_block_runs(
    block: Block, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    await scenario_of(block)(block, tmp_path, request)


def test_every_scenario_has_its_block() -> None:
    code = [block.code for block in blocks()]
    for marker in SCENARIOS:
        assert any(marker in c for c in code), f"no README block contains {marker!r} any more"
