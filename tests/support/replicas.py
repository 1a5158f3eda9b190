"""Bridge replicas as separate processes, and reading what they published.

Shared by the HA tests (``tests/ha/test_ha_processes.py``) and the failure suite
(``tests/chaos/``). Every replica is ``python -m bridge --log-level info run --config <file>``
with its own ``KOPRS_BRIDGE_REPLICA_ID`` and its own log file (printed when a test fails).

::

    Replica       one process: start, kill (SIGKILL), stop (SIGTERM), its log
    Cluster       the replicas of one test, each with a config and a log in ``tmp_path``
    cluster()     an async context: every replica stopped on exit, logs printed on failure
    until()       poll a condition (bounded), failing early when a replica died

A test module using replicas must kill what a failed test left behind: an autouse fixture
that calls :func:`kill_leftover_replicas` after each test.

Events are the dicts the raw consumers of ``tests/service/test_e2e.py`` decode (``_source_name`` added):
:func:`kind`, :func:`version`, :func:`history`, :func:`final_state` read them. Leases are read
from their Redis keys (:func:`holders`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from bridge.ha.keys import SourceKeys, as_text, prefix_for

__all__ = [
    "REPO",
    "WAIT_S",
    "Cluster",
    "Event",
    "Replica",
    "assert_given_up_sources_released",
    "assert_no_duplicates",
    "cluster",
    "final_state",
    "history",
    "holders",
    "kill_leftover_replicas",
    "kind",
    "logged",
    "redis_client",
    "spread",
    "summary",
    "until",
    "version",
]

WAIT_S = 45.0
"""Default bound of every wait on a condition (generous: only a broken bridge should reach it)."""
REPO = Path(__file__).resolve().parents[2]

Event = dict[str, Any]


_LIVE_PIDS: set[int] = set()
"""Replica processes started and not yet reaped: killed after each test whatever happened."""


class Replica:
    """One ``python -m bridge run`` process."""

    def __init__(self, name: str, config_path: Path, log_path: Path) -> None:
        self.name = name
        self.config_path = config_path
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.killed = False
        """Set when the test kills it on purpose (so its death is not a failure)."""

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KOPRS_BRIDGE")}
        env["KOPRS_BRIDGE_REPLICA_ID"] = self.name
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "bridge", "--log-level", "info"]
        command += ["run", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
                env=env,
            )
        _LIVE_PIDS.add(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def send(self, signum: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signum)

    async def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        assert self.proc is not None
        self.killed = True
        self.send(signal.SIGKILL)
        await self._reap()

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (after SIGCONT, in case it is paused); SIGKILL if it does not exit in time.

        The exit code, or None if it had to be killed.
        """
        if self.proc is None:
            return None
        if self.proc.returncode is not None:
            await self._reap()
            return self.proc.returncode
        self.resume()
        self.send(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await self._reap()
        except TimeoutError:
            self.send(signal.SIGKILL)
            await self._reap()
            return None
        return self.proc.returncode

    async def _reap(self) -> None:
        assert self.proc is not None
        await self.proc.wait()
        _LIVE_PIDS.discard(self.proc.pid)

    # -- the log --

    def log(self, since: int = 0) -> str:
        """The log from byte offset ``since`` (see :meth:`mark`)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """The log's current size: pass it as ``since`` to look only at what comes next."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def count(self, pattern: str, since: int = 0) -> int:
        return len(re.findall(pattern, self.log(since)))


def logged(replica: Replica, pattern: str, since: int = 0, times: int = 1) -> Callable[[], bool]:
    """A condition: ``replica`` logged a line matching ``pattern`` ``times`` times after
    ``since``."""
    return lambda: replica.count(pattern, since) >= times


def kill_leftover_replicas() -> None:
    """SIGKILL and reap every replica process still alive (call after each test)."""
    for pid in list(_LIVE_PIDS):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        _LIVE_PIDS.discard(pid)


class Cluster:
    """The replicas of one test, each with a config file and a log file in ``tmp_path``."""

    def __init__(self, tmp_path: Path, config_for: Callable[[str], dict[str, Any]]) -> None:
        self.tmp_path = tmp_path
        self.config_for = config_for
        self.replicas: dict[str, Replica] = {}

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]

    async def start(self, *names: str) -> None:
        for name in names:
            config_path = self.tmp_path / f"{name}.yaml"
            config_path.write_text(yaml.safe_dump(self.config_for(name), sort_keys=False))
            replica = Replica(name, config_path, self.tmp_path / f"{name}.log")
            self.replicas[name] = replica
            await replica.start()

    def check_alive(self) -> None:
        """Fail at once, with its log, when a replica the test did not kill has exited."""
        for replica in self.replicas.values():
            if not replica.killed and not replica.running:
                code = replica.proc.returncode if replica.proc else None
                pytest.fail(
                    f"replica {replica.name} exited (code {code}):\n{replica.log()[-4000:]}"
                )

    async def stop_all(self) -> dict[str, int | None]:
        names = list(self.replicas)
        codes = await asyncio.gather(*(self.replicas[n].stop() for n in names))
        return dict(zip(names, codes, strict=True))

    def logs(self, lines: int = 150) -> str:
        """The end of every log, without the HTTP requests and with repeated messages folded."""
        parts = []
        for replica in self.replicas.values():
            kept: list[str] = []
            last, repeats = "", 0
            for line in replica.log().splitlines():
                if " httpx: " in line:
                    continue
                message = line[24:]  # without the timestamp
                if message == last:
                    repeats += 1
                    continue
                if repeats:
                    kept.append(f"    (and {repeats} more times)")
                kept.append(line)
                last, repeats = message, 0
            if repeats:
                kept.append(f"    (and {repeats} more times)")
            tail = "\n".join(kept[-lines:])
            parts.append(f"----- {replica.name} ({replica.log_path}) -----\n{tail}")
        return "\n".join(parts)


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, config_for: Callable[[str], dict[str, Any]]
) -> AsyncIterator[Cluster]:
    """Replicas that are all stopped on exit (then their logs are checked: every source given
    up was released); their logs are printed when something failed."""
    replicas = Cluster(tmp_path, config_for)
    try:
        yield replicas
        await replicas.stop_all()
        assert_given_up_sources_released(replicas)
    except BaseException:
        print(f"replica logs (last lines):\n{replicas.logs()}")
        raise
    finally:
        await replicas.stop_all()


# -- waiting on conditions ---------------------------------------------------------------------


async def until(
    check: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    replicas: Cluster | None = None,
    timeout_s: float = WAIT_S,
    every_s: float = 0.05,
) -> None:
    """Poll ``check`` until it is true (bounded); fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if replicas is not None:
            replicas.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(every_s)


# -- reading events and Redis ------------------------------------------------------------------


def kind(event: Event) -> str:
    return str(event["type"].split(".")[-2])


def version(event: Event) -> str:
    """The item's version: the body digest (HTTP) or the ETag (objects)."""
    data = event["data"]
    return str(data["digest"] if "digest" in data else data["etag"])


def history(events: Sequence[Event], source: str, subject: str) -> list[tuple[str, str]]:
    """(kind, version) of every event of one item, in arrival order."""
    return [
        (kind(e), version(e))
        for e in events
        if e["_source_name"] == source and e["subject"] == subject
    ]


def final_state(events: Sequence[Event], source: str) -> dict[str, str]:
    """subject -> version after applying ``source``'s events in order."""
    state: dict[str, str] = {}
    for e in events:
        if e["_source_name"] != source:
            continue
        if kind(e) == "removed":
            state.pop(e["subject"], None)
        else:
            state[e["subject"]] = version(e)
    return state


def summary(events: Sequence[Event]) -> list[tuple[str, str, str, str, str]]:
    return [
        (e["_source_name"], e["subject"], kind(e), version(e)[:20], e["id"][:12]) for e in events
    ]


def assert_no_duplicates(events: Sequence[Event], *, allowed: Sequence[Event] = ()) -> None:
    """Unique event ids, and no (source, subject, type, version) twice (except ``allowed``)."""
    ids = Counter(e["id"] for e in events)
    assert [i for i, n in ids.items() if n > 1] == [], "an event id was delivered twice"
    exempt = {id(e) for e in allowed}
    changes = Counter(
        (e["_source_name"], e["subject"], e["type"], version(e))
        for e in events
        if id(e) not in exempt
    )
    twice = [c for c, n in changes.items() if n > 1]
    assert twice == [], f"the same change was published twice under different ids: {twice}"


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def holders(client: aioredis.Redis, sources: Sequence[str]) -> dict[str, tuple[str, int]]:
    """source -> (replica, fence) of every held lease, read from its Redis key (on a Redis
    Cluster, with the prefix the bridge uses there: bridge/ha/keys.py ``prefix_for``)."""
    held: dict[str, tuple[str, int]] = {}
    prefix = prefix_for(client)
    for name in sources:
        token = await client.get(SourceKeys(name, prefix).lease)
        if token is not None:
            replica, _, fence = as_text(token).rpartition("|")
            held[name] = (replica, int(fence))
    return held


async def spread(client: aioredis.Redis, sources: Sequence[str]) -> list[int]:
    """How many sources each replica holds, sorted (sources without a holder left out)."""
    return sorted(Counter(r for r, _ in (await holders(client, sources)).values()).values())


def assert_given_up_sources_released(replicas: Cluster) -> None:
    """Every "giving up source" in a replica's log is followed by the release of that lease
    (before that replica acquires the source again, and before its log ends)."""
    mention = re.compile(
        r"(giving up|acquired the lease on|released the lease on|releasing the lease on)"
        r" source '([^']+)'"
    )
    for replica in replicas.replicas.values():
        if replica.killed:
            continue  # a SIGKILL may have cut a hand-over short
        giving_up: set[str] = set()
        for match in mention.finditer(replica.log()):
            what, source = match.groups()
            if what == "giving up":
                giving_up.add(source)
            elif what.startswith("releas"):
                giving_up.discard(source)
            else:
                assert source not in giving_up, f"{replica.name} gave up {source} without release"
        assert not giving_up, f"{replica.name} gave up {sorted(giving_up)} without releasing"
