"""``bench/schedule_bench.py`` still runs (a minimal mode; its figures are not tested)."""

from __future__ import annotations

import math

import pytest

from bench import schedule_bench

pytestmark = pytest.mark.servers


def test_schedule_bench_smoke() -> None:
    rows = schedule_bench.run_rows(
        sources=20, interval=0.5, seconds=1.0, replicas=(1,), lease_ttl=1.0
    )
    assert [row.bench for row in rows] == ["schedule"] * 3
    assert all(row.ratio is not None and math.isfinite(row.ratio) for row in rows)
    assert rows[2].values["led"] == 20
