"""Failover: from SIGKILL of a source's leader to the first event its successor publishes.

``python -m bench.failover_bench`` (``--help``). Real ``redis-server`` (leader election and
checkpoints) and ``nats-server`` (the broker), from ``tests/support/servers.py``; ``--replicas`` (3)
replicas of the bridge, each its own ``python -m bridge run`` process with the same config (as
``tests/ha/test_ha_processes.py`` runs them): one local-folder source polled every
``--interval`` (0.5 s), ``leader_election.lease_ttl`` ``--ttl`` (2 s), ``renew_every`` left at
its default (a third of the TTL). A raw nats-py subscription takes the arrival times.

Each run waits a random part of a renewal period (so the kill falls anywhere in the lease's
life), reads the holder of the source's lease from Redis, SIGKILLs that process and at once
adds a file to the folder: only a new leader can publish it. Measured: the time from the kill
to that event's arrival, and (polled every 5 ms) to the lease's new token in Redis. A new
replica is started after each run, so there are always ``--replicas`` when the leader dies.
Target: every run <= lease_ttl + interval.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, Row, env_with_repo, format_table, write_rows
from bench.latency_bench import Arrivals, write_change
from tests.support.servers import NatsServer, RedisServer

SOURCE = "failover"


class Replica:
    """One ``python -m bridge run`` process."""

    def __init__(self, name: str, config_path: Path, work: Path) -> None:
        self.name = name
        self.config_path = config_path
        self.log_path = work / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in env_with_repo().items() if not k.startswith("KOPRS_BRIDGE")}
        env["KOPRS_BRIDGE_REPLICA_ID"] = self.name
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "--log-level", "info",
                "run", "--config", str(self.config_path),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env=env,
            )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
        await self.proc.wait()

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""


async def live_replicas(client: Any) -> list[str]:
    from bridge.ha.keys import as_text, replicas_key

    now_s, now_us = await client.time()
    members = await client.zrangebyscore(replicas_key(), now_s * 1000 + now_us // 1000, "+inf")
    return [as_text(m) for m in members]


async def holder(client: Any) -> str | None:
    from bridge.ha.keys import SourceKeys, as_text

    token = await client.get(SourceKeys(SOURCE).lease)
    return None if token is None else as_text(token)


async def until(check: Any, what: str, timeout_s: float, every_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(every_s)


async def measure(
    *, runs: int, replicas: int, ttl_s: float, interval_s: float, seed: int | None
) -> dict[str, Any]:
    import nats
    import redis.asyncio as aioredis

    from bridge.subjects import nats_subject

    rng = random.Random(seed)
    renew_s = ttl_s / 3  # the service's default renew_every
    work = Path(tempfile.mkdtemp(prefix="koprs-bench-failover-"))
    folder, staging = work / "watched", work / "staging"
    folder.mkdir()
    staging.mkdir()
    arrivals = Arrivals()
    started: list[Replica] = []
    failovers: list[float] = []
    acquired: list[float] = []
    try:
        with RedisServer() as redis_server, NatsServer() as nats_server:
            config = {
                "broker": {"url": nats_server.url, "ack_timeout": 2},
                "leader_election": {"redis_url": redis_server.url, "lease_ttl": ttl_s},
                "sources": [
                    {"name": SOURCE, "interval": interval_s, "local": {"path": str(folder)}}
                ],
            }
            config_path = work / "bridge.yaml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            client = aioredis.from_url(redis_server.url)
            nc = await nats.connect(nats_server.url)

            async def on_message(msg: Any) -> None:
                arrivals.record(msg.headers.get("ce-subject", "") if msg.headers else "")

            await nc.subscribe(nats_subject(SOURCE, "x").rsplit(".", 1)[0] + ".>", cb=on_message)
            by_name: dict[str, Replica] = {}

            async def start(name: str) -> None:
                replica = Replica(name, config_path, work)
                await replica.start()
                started.append(replica)
                by_name[name] = replica

            for i in range(replicas):
                await start(f"r{i + 1}")
            next_id = replicas + 1
            try:
                write_change(folder, staging, "warm")
                await arrivals.wait_for(["warm"], 60)

                async def all_live() -> bool:
                    return len(await live_replicas(client)) >= replicas

                await until(all_live, f"{replicas} live replicas", 60)
                for run in range(runs):
                    await asyncio.sleep(0.5 + rng.uniform(0.0, renew_s))
                    token = await holder(client)
                    if token is None:
                        raise RuntimeError("nobody holds the source's lease")
                    leader = token.rpartition("|")[0]
                    killed_at = time.monotonic()
                    by_name[leader].kill()
                    key = f"after-kill-{run:03d}"
                    write_change(folder, staging, key)

                    async def taken(old: str = token) -> bool:
                        now = await holder(client)
                        return now is not None and now != old

                    await until(taken, "a new lease holder", ttl_s * 4 + 30, every_s=0.005)
                    acquired.append(time.monotonic() - killed_at)
                    await arrivals.wait_for([key], ttl_s * 4 + 30)
                    failovers.append(arrivals.at[key] - killed_at)
                    print(
                        f"failover: run {run + 1}/{runs}: killed {leader}; lease taken after "
                        f"{acquired[-1]:.2f} s, first event after {failovers[-1]:.2f} s",
                        flush=True,
                    )
                    await by_name[leader].stop()  # reap it
                    await start(f"r{next_id}")
                    next_id += 1
                    await until(all_live, f"{replicas} live replicas", 60)
            except BaseException:
                for replica in started:
                    print(f"----- {replica.name} -----\n{replica.log_tail()}", file=sys.stderr)
                raise
            finally:
                await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)
                await nc.close()
                await client.aclose()
    finally:
        for replica in started:
            replica.kill()
        shutil.rmtree(work, ignore_errors=True)
    return {"failover": failovers, "acquired": acquired}


def rows_of(m: dict[str, list[float]], ttl_s: float, interval_s: float, replicas: int) -> list[Row]:
    values, acquired = m["failover"], m["acquired"]
    worst, middle = max(values), statistics.median(values)
    limit = ttl_s + interval_s
    return [
        Row(
            "failover",
            f"SIGKILL leader -> first event, {len(values)} runs, {replicas} replicas",
            f"median {middle:.2f} s, max {worst:.2f} s",
            f"lease_ttl {ttl_s:g} s",
            worst / ttl_s,
            f"max <= {limit:g} s (ttl + interval)",
            worst <= limit,
            f"lease taken after median {statistics.median(acquired):.2f} s, max "
            f"{max(acquired):.2f} s; ratio = max / lease_ttl; renew_every {ttl_s / 3:.2f} s "
            f"(default), interval {interval_s:g} s",
            {
                "median_s": middle,
                "max_s": worst,
                "min_s": min(values),
                "acquired_median_s": statistics.median(acquired),
                "acquired_max_s": max(acquired),
                "ttl_s": ttl_s,
                "interval_s": interval_s,
                "runs": len(values),
            },
        )
    ]


def run_rows(
    *,
    runs: int = 6,
    replicas: int = 3,
    ttl_s: float = 2.0,
    interval_s: float = 0.5,
    seed: int | None = None,
) -> list[Row]:
    m = asyncio.run(
        measure(runs=runs, replicas=replicas, ttl_s=ttl_s, interval_s=interval_s, seed=seed)
    )
    return rows_of(m, ttl_s, interval_s, replicas)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=2.0, help="lease_ttl, seconds")
    parser.add_argument("--interval", type=float, default=0.5, help="poll interval, seconds")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--rows-json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.replicas < 2 or args.runs < 1:
        parser.error("--replicas must be >= 2 and --runs >= 1")
    rows = run_rows(
        runs=args.runs,
        replicas=args.replicas,
        ttl_s=args.ttl,
        interval_s=args.interval,
        seed=args.seed,
    )
    print(format_table(rows))
    for row in rows:
        print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
