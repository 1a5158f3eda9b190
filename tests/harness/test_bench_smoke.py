"""The benchmarks of ``bench/`` still run: each in a minimal mode, asserting only that it produces
a row with a ratio (never its value: timings are not tested in CI). The failover benchmark is
left out (a single run takes several seconds of lease expiry); ``make bench-quick`` runs it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from bench import http_bench, latency_bench, recovery_bench, run, s3_bench
from bench.common import Row, format_table

pytestmark = pytest.mark.servers


def check(rows: Sequence[Row], bench: str) -> None:
    assert rows, f"{bench}: no rows"
    for row in rows:
        assert row.bench == bench
        assert row.ratio is not None, row
        assert math.isfinite(row.ratio), row
    assert format_table(rows)
    assert run.results_markdown(rows, {"CPU": "test"}, "test", {bench: 1.0}, [])


def test_publish_bench_smoke() -> None:
    check(run.publish_rows(events=200, rounds=1, batch=100), "publish")


def test_http_bench_smoke() -> None:
    check(http_bench.run_rows(sources=20, seconds=0.3, rounds=1, capacity_s=0.3), "http")


def test_s3_bench_smoke() -> None:
    check(s3_bench.run_rows(objects=200, rounds=1), "s3")


def test_diff_bench_smoke() -> None:
    check(run.diff_rows(objects=3000, repeat=1), "diff")


def test_latency_bench_smoke() -> None:
    rows = latency_bench.run_rows(samples=3, interval_s=0.2, gap_s=0.05, seed=1)
    check(rows, "latency")


def test_recovery_bench_smoke() -> None:
    check(recovery_bench.run_rows(items=300, rounds=1), "recovery")
