"""Every benchmark of the bridge against its reference, in one table: ``make bench``.

``python -m bench`` (= ``python -m bench.run``) runs, each in a child process of its own,

==========  ==========================================================  =====================
publish     events/s of the publish path vs the raw clients               bench/publish_bench.py
http        polls/s of 2,000 HTTP sources vs a plain httpx loop; memory   bench/http_bench.py
s3          listing + diff of 100,000 objects (moto) vs listing alone    bench/s3_bench.py
diff        CPU and memory of the 1,000,000-object in-memory diff        bench/diff_bench.py
latency     change -> consumer handler, p50/p99 vs the poll interval     bench/latency_bench.py
failover    SIGKILL of a leader -> first event of the next, vs lease_ttl bench/failover_bench.py
schedule    10,000 HTTP sources every 30 s, 5,000 every 10 s (lag, missed    bench/schedule_bench.py
            ticks, CPU, RSS) vs plain httpx; leader election with 1 and 3
            replicas: Redis commands, leases lost, all leased, failover
folder      polls of a 1,000,000-file local: folder (no change, 1 %      bench/folder_bench.py
            changed, first) vs a bare scandir+stat walk; steady RSS
recovery    100,000 items' state rebuilt from NATS / Redis vs a raw read bench/recovery_bench.py
cluster     R3 stream, Redis Cluster sink vs the raw clients; failovers bench/cluster_bench.py
==========  ==========================================================  =====================

and prints one table: the bridge's figure, the reference measured in the same run, their
ratio, the target and PASS/FAIL. ``--quick`` takes about two minutes, the full run about ten.
``--write-results`` also writes ``bench/RESULTS.md`` (the table, the notes, the machine).
Everything listens on 127.0.0.1 only; every server is started here and stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Row,
    describe,
    env_with_repo,
    format_table,
    load_average,
    machine,
    read_rows,
)
from bench.common import write_rows as _write_rows

BENCHES = (
    "publish",
    "http",
    "s3",
    "diff",
    "latency",
    "failover",
    "schedule",
    "folder",
    "recovery",
    "cluster",
)
RESULTS = REPO / "bench" / "RESULTS.md"

# Per benchmark: the options of a full run and of a quick one.
FULL: dict[str, dict[str, Any]] = {
    "publish": {"events": 20_000, "rounds": 3, "batch": 1000},
    "http": {"sources": 2000, "seconds": 8.0, "rounds": 2, "capacity_s": 5.0},
    "s3": {"objects": 100_000, "rounds": 2},
    "diff": {"objects": 1_000_000, "repeat": 3},
    "latency": {"samples": 400, "interval_s": 0.5, "gap_s": 0.1},
    "failover": {"runs": 6, "replicas": 3, "ttl_s": 2.0, "interval_s": 0.5},
    "schedule": {
        "sets": (
            {"sources": 10_000, "interval": 30.0, "seconds": 60.0, "replicas": ()},
            {
                "sources": 5000,
                "interval": 10.0,
                "seconds": 30.0,
                "replicas": (1, 3),
                "failover": True,
            },
        )
    },
    "folder": {"files": 1_000_000, "repeat": 2},
    "recovery": {"items": 100_000, "rounds": 2},
    "cluster": {"events": 20_000, "batch": 1000},
}
QUICK: dict[str, dict[str, Any]] = {
    "publish": {"events": 5000, "rounds": 2, "batch": 1000},
    "http": {"sources": 500, "seconds": 3.0, "rounds": 2, "capacity_s": 2.0},
    "s3": {"objects": 20_000, "rounds": 2},
    "diff": {"objects": 200_000, "repeat": 2},
    "latency": {"samples": 60, "interval_s": 0.5, "gap_s": 0.1},
    "failover": {"runs": 2, "replicas": 3, "ttl_s": 2.0, "interval_s": 0.5},
    "schedule": {
        "sets": (
            {"sources": 1000, "interval": 10.0, "seconds": 10.0, "replicas": ()},
            {
                "sources": 200,
                "interval": 2.0,
                "seconds": 6.0,
                "replicas": (1, 3),
                "lease_ttl": 4.0,
                "failover": True,
                "election_only": True,
            },
        )
    },
    "folder": {"files": 100_000, "repeat": 2},
    "recovery": {"items": 20_000, "rounds": 1},
    "cluster": {"events": 5000, "batch": 1000},
}


# -- adapters for the two older benchmarks ----------------------------------------------------


def publish_rows(*, events: int, rounds: int, batch: int) -> list[Row]:
    """``bench/publish_bench.py``'s cases (both brokers, 300 B and 10 KiB, every path)."""
    import asyncio

    from bench import publish_bench as pb

    cases = [
        pb.Case(broker, size, batch, events if size < 1024 else max(events // 4, batch))
        for broker in ("nats", "redis")
        for size in (300, 10 * 1024)
    ]
    print(pb.HEADER, flush=True)
    notes: list[str] = []
    found = asyncio.run(pb.run(cases, rounds, list(pb.PATHS), Path(tempfile.gettempdir()), notes))
    rows = []
    for r in found:
        intent, publish, commit, rest = r.best.per_event_us(r.case.events)
        size = f"{r.case.data_bytes // 1024} KiB" if r.case.data_bytes >= 1024 else "300 B"
        broker = "JetStream" if r.case.broker == "nats" else "Redis"
        rows.append(
            Row(
                "publish",
                f"{broker} {size} batch {r.case.batch} {r.path}",
                f"{r.bridge_eps:,.0f} ev/s",
                f"raw {r.raw_eps:,.0f} ev/s",
                r.ratio,
                f"ratio >= {pb.TARGET}",
                r.ratio >= pb.TARGET,
                f"µs/event: intent {intent:.1f}, publish {publish:.1f}, commit {commit:.1f}, "
                f"rest {rest:.1f}" + ("" if r.path == pb.SINK_ONLY else "; the full path"),
                {
                    "bridge_eps": r.bridge_eps,
                    "raw_eps": r.raw_eps,
                    "events": r.case.events,
                    "intent_us": intent,
                    "publish_us": publish,
                    "commit_us": commit,
                    "rest_us": rest,
                },
            )
        )
    return rows


def diff_rows(*, objects: int, repeat: int) -> list[Row]:
    """``bench/diff_bench.py``'s CPU and tracemalloc phases (each in its own process)."""
    from bench import diff_bench as db

    n = objects
    print(f"diff: cpu phase, {n:,} objects, {repeat} runs ...", flush=True)
    cpu = db.run_phase("cpu", n, repeat)
    print("diff: tracemalloc phase ...", flush=True)
    mem = db.run_phase("tracemalloc", n, 1)
    best, reference = min(cpu["nochange"]), min(cpu["reference"])
    limit = db.CPU_TARGET_S_PER_MILLION * n / 1e6
    retained = mem["retained"] / n
    strings = (mem["key_bytes"] + mem["etag_str_bytes"]) / n  # as a listing holds them
    return [
        Row(
            "diff",
            f"no-change diff, {n:,} objects, CPU",
            f"{best:.3f} s (median {sorted(cpu['nochange'])[len(cpu['nochange']) // 2]:.3f})",
            f"bare dict.get loop {reference:.3f} s",
            best / reference,
            f"< {limit:.3g} s",
            best < limit,
            f"ratio = diff / loop (time); 1% changes {min(cpu['changed']):.3f} s; first poll "
            f"(all Added) + commit {cpu['initial']:.2f} s",
            {"nochange_s": best, "reference_s": reference, "changed_s": min(cpu["changed"])},
        ),
        Row(
            "diff",
            f"tracked state, {n:,} objects, memory",
            f"{retained:.0f} B/object",
            f"its key + ETag strings {strings:.0f} B",
            retained / strings,
            f"< {db.MEMORY_TARGET_B:.0f} B/object",
            retained < db.MEMORY_TARGET_B,
            f"tracemalloc; key list + ETag digests alone {mem['structure'] / n:.1f} B/object; "
            f"no-change diff peak {mem['nochange_peak'] / n:.1f} B/object",
            {
                "retained_b": retained,
                "strings_b": strings,
                "structure_b": mem["structure"] / n,
                "nochange_peak_b": mem["nochange_peak"] / n,
            },
        ),
    ]


def runner(name: str) -> Callable[..., list[Row]]:
    if name == "publish":
        return publish_rows
    if name == "diff":
        return diff_rows
    if name == "http":
        from bench import http_bench

        return http_bench.run_rows
    if name == "s3":
        from bench import s3_bench

        return s3_bench.run_rows
    if name == "latency":
        from bench import latency_bench

        return latency_bench.run_rows
    if name == "schedule":
        from bench import schedule_bench

        return schedule_bench.run_sets
    if name == "folder":
        from bench import folder_bench

        return folder_bench.run_rows
    if name == "failover":
        from bench import failover_bench

        return failover_bench.run_rows
    if name == "recovery":
        from bench import recovery_bench

        return recovery_bench.run_rows
    if name == "cluster":
        from bench import cluster_bench

        return cluster_bench.run_rows
    raise ValueError(f"unknown benchmark {name!r}")


# -- orchestration ----------------------------------------------------------------------------


def run_child(name: str, quick: bool) -> tuple[list[Row], float, str | None]:
    """One benchmark in its own process: its rows, its duration and an error if it failed."""
    with tempfile.TemporaryDirectory(prefix="koprs-bench-") as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", "bench.run", "--child", name, "--rows-json", str(out)]
        if quick:
            command.append("--quick")
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env_with_repo(), check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0 or not out.exists():
            return [], elapsed, f"{name} failed (exit code {done.returncode}); see its output above"
        return read_rows(out), elapsed, None


def results_markdown(
    rows: Sequence[Row],
    info: dict[str, str],
    command: str,
    durations: dict[str, float],
    errors: Sequence[str],
) -> str:
    passed = sum(r.ok is True for r in rows)
    judged = sum(r.ok is not None for r in rows)
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. What each row "
        "measures and how: [README.md](README.md).",
        "",
        "## Machine",
        "",
        *(f"* {key}: {value}" for key, value in info.items()),
        f"* load average at the end: {load_average()}",
        "",
        f"## Results: {passed} of {judged} targets met",
        "",
        format_table(rows, markdown=True),
        "",
        "## Notes per row",
        "",
        *(f"* **{r.bench} / {r.name}**: {r.note}" for r in rows if r.note),
        "",
        "Duration per benchmark: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in durations.items())
        + ".",
    ]
    if errors:
        lines += ["", "## Errors", "", *(f"* {e}" for e in errors)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about two minutes)")
    parser.add_argument(
        "--only", help=f"comma-separated subset of {','.join(BENCHES)} (default: all)"
    )
    parser.add_argument(
        "--write-results", action="store_true", help=f"write {RESULTS.relative_to(REPO)}"
    )
    parser.add_argument("--json", type=Path, help="also write every row as JSON to this file")
    parser.add_argument("--child", choices=BENCHES, help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one benchmark, in the child process run_child started
        options = (QUICK if args.quick else FULL)[args.child]
        found = runner(args.child)(**options)
        if args.rows_json:
            _write_rows(args.rows_json, found)
        return 0

    names = list(BENCHES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BENCHES))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose among {BENCHES}")
    info = machine()
    print(describe(info), flush=True)
    rows: list[Row] = []
    durations: dict[str, float] = {}
    errors: list[str] = []
    started = time.perf_counter()
    for name in names:
        print(f"\n=== {name} ({'quick' if args.quick else 'full'}) ===", flush=True)
        found, elapsed, error = run_child(name, args.quick)
        rows += found
        durations[name] = elapsed
        if error:
            errors.append(error)
    total = time.perf_counter() - started

    print(f"\n=== results ({total:.0f} s) ===\n")
    print(format_table(rows))
    print("\nnotes:")
    for row in rows:
        if row.note:
            print(f"  {row.bench} / {row.name}: {row.note}")
    passed = sum(r.ok is True for r in rows)
    judged = sum(r.ok is not None for r in rows)
    print(f"\n{passed} of {judged} targets met; {len(errors)} benchmark(s) failed to run")
    print(f"load average now: {load_average()} (figures taken on a busy machine are noisy)")
    for error in errors:
        print(f"  {error}")
    if args.json:
        _write_rows(args.json, rows)
    if args.write_results:
        command = "make bench-quick" if args.quick else "make bench"
        if args.only:
            command = f"python -m bench {'--quick ' if args.quick else ''}--only {args.only}"
        RESULTS.write_text(results_markdown(rows, info, command, durations, errors))
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
