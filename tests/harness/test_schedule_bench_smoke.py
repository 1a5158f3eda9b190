"""`bench/schedule_bench.py` and `bench/folder_bench.py` still run (minimal modes; figures untested)."""

from __future__ import annotations

import math

import pytest

from bench import schedule_bench

pytestmark = pytest.mark.servers


def test_schedule_bench_smoke() -> None:
    rows = schedule_bench.run_rows(
        sources=20, interval=0.5, seconds=1.0, replicas=(1,), lease_ttl=1.0
    )
    assert [row.bench for row in rows] == ["schedule"] * 4  # 2 single, 2 leader election
    assert all(row.ratio is not None and math.isfinite(row.ratio) for row in rows)
    assert rows[2].values["led"] == 20


def test_schedule_bench_failover_smoke() -> None:
    rows = schedule_bench.run_rows(
        sources=20, interval=0.5, seconds=1.0, replicas=(2,), lease_ttl=1.0, failover=True,
        election_only=True,
    )  # fmt: skip
    assert [row.name.split(": ")[-1] for row in rows] == [
        "Redis commands",
        "every source leased",
        "SIGKILL one -> all its sources polled again",
    ]
    assert all(row.ratio is not None and math.isfinite(row.ratio) for row in rows)


def test_folder_bench_smoke() -> None:
    from bench import folder_bench

    rows = folder_bench.run_rows(files=1500, repeat=1)
    assert [row.bench for row in rows] == ["folder"] * 4  # no change, 1 %, first, RSS
    assert all(row.ratio is not None and math.isfinite(row.ratio) for row in rows)
    assert rows[-1].values["unpacked"] == 0
    assert rows[1].values["changed"] == 15
