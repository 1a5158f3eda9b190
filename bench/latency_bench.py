"""Latency from a change at the source to a consumer's handler, against the poll interval.

``python -m bench.latency_bench`` (``--help``). A real ``nats-server``
(``tests/support/servers.py``) and the bridge as its own process (``python -m bridge run``)
watching a local folder every
``--interval`` (default 0.5 s; the service's default jitter of 5 % of it applies). This
process makes changes at random times (exponential gaps, mean ``--gap``, independent of the
poll phase): each change is a new file, written beside the folder and renamed into it, and its
time is taken when the rename returned. Two consumers in this process take the time when their
handler gets the event of that file:

* ``watch_nats``: ``bridge.consumer.watch_nats`` (a JetStream pull consumer, live changes
  only), each delivery acknowledged;
* ``raw sub``: a plain nats-py core subscription on ``koprs.external.<source>.>``.

A change waits for the next poll (0 to interval later, plus jitter), then is listed, diffed,
published and delivered: p50 is expected near half the interval and p99 near the interval plus
the processing. Target: p99 <= interval + 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, Row, env_with_repo, format_table, percentile, write_rows
from tests.support.servers import NatsServer

SOURCE = "latency"
SLACK_S = 0.05


@contextlib.asynccontextmanager
async def bridge_process(config: dict[str, Any], work: Path, name: str) -> AsyncIterator[Path]:
    """``python -m bridge run`` with ``config``; yields its log file."""
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = work / f"{name}.log"
    env = {k: v for k, v in env_with_repo().items() if not k.startswith("KOPRS_BRIDGE")}
    env["KOPRS_BRIDGE_REPLICA_ID"] = name
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "--log-level", "warning",
            "run", "--config", str(config_path),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )  # fmt: skip
    try:
        yield log_path
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class Arrivals:
    """When each key reached a consumer."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.changed = asyncio.Event()

    def record(self, key: str) -> None:
        self.at.setdefault(key, time.monotonic())
        self.changed.set()

    async def wait_for(self, keys: Sequence[str], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not all(k in self.at for k in keys):
                self.changed.clear()
                await self.changed.wait()


def write_change(folder: Path, staging: Path, key: str) -> float:
    """A new file ``key`` in ``folder``, complete when it appears; the time it appeared."""
    temp = staging / key
    temp.write_bytes(os.urandom(64))
    os.replace(temp, folder / key)
    return time.monotonic()


async def measure(
    *, samples: int, interval_s: float, gap_s: float, seed: int | None
) -> dict[str, Any]:
    import nats

    from bridge.consumer import Delivery, watch_nats
    from bridge.subjects import nats_subject

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="koprs-bench-latency-"))
    folder, staging = work / "watched", work / "staging"
    folder.mkdir()
    staging.mkdir()
    raw, watched = Arrivals(), Arrivals()
    try:
        with NatsServer() as nats_server:
            config = {
                "broker": {"url": nats_server.url},
                "sources": [
                    {"name": SOURCE, "interval": interval_s, "local": {"path": str(folder)}}
                ],
            }
            nc = await nats.connect(nats_server.url)

            async def on_message(msg: Any) -> None:
                raw.record(msg.headers.get("ce-subject", "") if msg.headers else "")

            await nc.subscribe(nats_subject(SOURCE, "x").rsplit(".", 1)[0] + ".>", cb=on_message)
            async with bridge_process(config, work, "latency-bridge") as log:
                warm = [f"warm-{i}" for i in range(2)]
                write_change(folder, staging, warm[0])
                try:
                    await raw.wait_for(warm[:1], 60)
                except TimeoutError as exc:
                    tail = log.read_text()[-3000:]
                    raise RuntimeError(f"no event from the bridge: {tail}") from exc
                async with watch_nats(nats_server.url, [SOURCE], list_first=False) as watch:

                    async def consume() -> None:
                        async for item in watch:
                            if isinstance(item, Delivery):
                                watched.record(item.envelope.key)
                                await item.ack()

                    consumer = asyncio.create_task(consume())
                    try:
                        write_change(folder, staging, warm[1])  # the watch is live
                        await watched.wait_for(warm[1:], 30)
                        changed: dict[str, float] = {}
                        print(f"latency: {samples} changes, mean gap {gap_s} s ...", flush=True)
                        for i in range(samples):
                            await asyncio.sleep(rng.expovariate(1 / gap_s))
                            key = f"change-{i:05d}"
                            changed[key] = write_change(folder, staging, key)
                        keys = list(changed)
                        timeout = interval_s * 4 + 30
                        await raw.wait_for(keys, timeout)
                        await watched.wait_for(keys, timeout)
                    finally:
                        consumer.cancel()
                        await asyncio.gather(consumer, return_exceptions=True)
            await nc.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "raw": [raw.at[k] - changed[k] for k in keys],
        "watch": [watched.at[k] - changed[k] for k in keys],
    }


def rows_of(latencies: dict[str, list[float]], interval_s: float) -> list[Row]:
    rows = []
    limit = interval_s + SLACK_S
    for key, label in (("watch", "watch_nats"), ("raw", "raw nats sub")):
        values = latencies[key]
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        worst = max(values)
        rows.append(
            Row(
                "latency",
                f"change -> {label} handler, {len(values)} changes",
                f"p50 {p50 * 1e3:,.0f} ms, p99 {p99 * 1e3:,.0f} ms",
                f"interval {interval_s * 1e3:,.0f} ms",
                p99 / interval_s,
                f"p99 <= {limit * 1e3:,.0f} ms",
                p99 <= limit,
                f"max {worst * 1e3:,.0f} ms; ratio = p99 / interval; local folder source, "
                "bridge in its own process",
                {
                    "p50_s": p50,
                    "p90_s": percentile(values, 0.9),
                    "p99_s": p99,
                    "max_s": worst,
                    "interval_s": interval_s,
                    "samples": len(values),
                },
            )
        )
    return rows


def run_rows(
    *, samples: int = 400, interval_s: float = 0.5, gap_s: float = 0.1, seed: int | None = None
) -> list[Row]:
    latencies = asyncio.run(measure(samples=samples, interval_s=interval_s, gap_s=gap_s, seed=seed))
    return rows_of(latencies, interval_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=400, help="changes (default 400)")
    parser.add_argument("--interval", type=float, default=0.5, help="poll interval, seconds")
    parser.add_argument("--gap", type=float, default=0.1, help="mean seconds between changes")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--rows-json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = run_rows(samples=args.samples, interval_s=args.interval, gap_s=args.gap, seed=args.seed)
    print(format_table(rows))
    for row in rows:
        print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
