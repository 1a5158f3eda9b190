"""``examples/config_operator.py`` against the real brokers, fed by the bridge running in process.

A local folder is the bridge's source; the example mirrors its items into another folder. The
test changes the source folder and waits for the example's lines, then checks the mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

from bridge.cloudevents import CloudEvent
from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from bridge.subjects import encode_item_token

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "config_operator.py"


class Published:
    """Counts what the bridge published (its ``on_published`` callback)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def __call__(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        self.count += len(events)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(30):
            while self.count < count:
                await self._changed.wait()


@contextlib.asynccontextmanager
async def running_bridge(raw: dict[str, Any], published: Published) -> AsyncIterator[Bridge]:
    bridge = Bridge(parse_config(raw, env={}), shutdown_grace_s=1, on_published=published)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield bridge
    finally:
        stop.set()
        await task


class Operator:
    """The example, running as a subprocess."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            raw = await self.process.stdout.readline()
        if not raw:
            assert self.process.stderr is not None
            pytest.fail(f"the example ended: {(await self.process.stderr.read()).decode()}")
        return raw.decode().rstrip("\n")

    async def lines(self, count: int) -> list[str]:
        return [await self.line() for _ in range(count)]

    async def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            return await self.process.wait()


@contextlib.asynccontextmanager
async def operator(*args: str) -> AsyncIterator[Operator]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        yield Operator(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def put(folder: Path, staging: Path, name: str, data: bytes) -> None:
    (staging / name).write_bytes(data)
    os.replace(staging / name, folder / name)


def mirror(target: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in target.iterdir() if p.is_file()}


@pytest.mark.parametrize("broker", ["nats", "redis"])
async def test_the_example_mirrors_a_source(
    broker: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url: str = request.getfixturevalue(f"{broker}_url")
    watched, staging, target = tmp_path / "watched", tmp_path / "staging", tmp_path / "mirror"
    for folder in (watched, staging, target):
        folder.mkdir()
    (target / "stale").write_text("{}")  # no such item: pruned once the list is in
    tag = uuid.uuid4().hex[:12]
    stream, prefix = f"T{tag}", f"t{tag}.koprs.external"
    broker_config: dict[str, Any] = {"url": url}
    args = ["--broker", url, "--source", "configs", "--target", str(target)]
    if broker == "nats":
        broker_config |= {"stream": stream, "subject_prefix": prefix}
        args += ["--stream", stream, "--subject-prefix", prefix]
    raw = {
        "broker": broker_config,
        "sources": [
            {
                "name": "configs",
                "interval": 0.05,
                "max_backoff": 0.2,
                "local": {"path": str(watched)},
            }
        ],
    }
    put(watched, staging, "a.yaml", b"a: 1\n")
    put(watched, staging, "dir b.yaml", b"b: 1\n")
    published = Published()
    try:
        async with running_bridge(raw, published):
            await published.wait_for(2)  # the items exist before the operator starts
            async with operator(*args) as op:
                listed = await op.lines(4)
                assert sorted(listed[:3]) == [
                    "pruned stale",
                    "wrote a.yaml (a~2Eyaml)",
                    "wrote dir b.yaml (dir~20b~2Eyaml)",
                ]
                assert listed[3] == f"synced: 2 item(s) in {target}"
                assert mirror(target)["a~2Eyaml"]["path"] == "a.yaml"
                assert mirror(target)["a~2Eyaml"]["size"] == 5

                put(watched, staging, "a.yaml", b"a: 22\n")
                assert await op.line() == "wrote a.yaml (a~2Eyaml)"
                (watched / "dir b.yaml").unlink()
                assert await op.line() == "deleted dir b.yaml (dir~20b~2Eyaml)"
                put(watched, staging, "new.yaml", b"n\n")
                assert await op.line() == f"wrote new.yaml ({encode_item_token('new.yaml')})"
                code = await op.interrupt()
    finally:
        if broker == "nats":
            nc = await nats.connect(url)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream)
            await nc.close()
    assert code == 0
    state = mirror(target)
    assert sorted(state) == ["a~2Eyaml", "new~2Eyaml"]
    assert state["a~2Eyaml"]["size"] == 6
    assert state["new~2Eyaml"] == {
        "path": "new.yaml",
        "etag": state["new~2Eyaml"]["etag"],
        "size": 2,
        "last_modified": state["new~2Eyaml"]["last_modified"],
    }
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temporary file left
