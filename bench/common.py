"""What every benchmark of ``bench/`` shares: the result row, the table, the machine, helpers.

A benchmark module exposes ``run_rows(...) -> list[Row]`` (keyword options, a minimal mode for
the smoke test) and can be run alone (``python -m bench.http_bench --help``). ``bench/run.py``
runs each in a child process and prints one table.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REPO",
    "Row",
    "format_table",
    "machine",
    "percentile",
    "read_rows",
    "rss_bytes",
    "trim_heap",
    "write_rows",
]

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of the table: the bridge against a reference measured in the same run."""

    bench: str
    """``publish``, ``http``, ``s3``, ``diff``, ``latency``, ``failover``."""
    name: str
    bridge: str
    """The bridge's figure, formatted (``"1,234 polls/s"``)."""
    reference: str
    """The reference's figure, formatted, with what it is (``"raw 1,500 polls/s"``)."""
    ratio: float | None
    """Of the two figures, as the row's target reads it (see bench/README.md)."""
    target: str
    """The target in words (``"ratio >= 0.8"``, ``"p99 <= 550 ms"``); ``""`` for info rows."""
    ok: bool | None
    """PASS/FAIL against the target; None for info rows."""
    note: str = ""
    values: dict[str, float] = dataclasses.field(default_factory=dict)
    """The raw numbers behind the row (seconds, counts...), for RESULTS.md and scripts."""

    @property
    def verdict(self) -> str:
        return "info" if self.ok is None else ("PASS" if self.ok else "FAIL")


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    path.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))


def read_rows(path: Path) -> list[Row]:
    return [Row(**item) for item in json.loads(path.read_text())]


def format_table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    header = ("bench", "row", "bridge", "reference", "ratio", "target", "result")
    lines = [
        (
            r.bench,
            r.name,
            r.bridge,
            r.reference,
            "" if r.ratio is None else f"{r.ratio:.2f}",
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for line in lines:
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |")
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {4}  # the ratio

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(header), *(fmt(line) for line in lines)])


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1), linear between the closest ranks."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    pos = fraction * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Collect, then give the C heap's free memory back to the OS (glibc), for RSS deltas."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- the machine -----------------------------------------------------------------------------


def _first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "?"


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


PACKAGES = ("nats-py", "redis", "httpx", "httpcore", "aioboto3", "aiobotocore", "moto", "orjson")


def machine() -> dict[str, str]:
    """What the figures were taken on."""
    from tests.support.servers import RedisServer, nats_server_binary

    try:
        nats_server = _first_line([nats_server_binary(), "--version"])
    except Exception:
        nats_server = "not found"
    try:
        redis_server = _first_line([RedisServer.binary(), "--version"])
    except Exception:
        redis_server = "not found"
    nginx = shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin:" + os.environ["PATH"])
    info = {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "RAM": _memory(),
        "OS": f"{_os_name()} ({platform.system()} {platform.release()} {platform.machine()})",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(f"{p} {_version(p)}" for p in PACKAGES),
        "servers": f"{nats_server}; {redis_server}; "
        + (_first_line([nginx, "-v"]) if nginx else "nginx not found"),
    }
    info["load average at start"] = load_average()
    return info


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was (2 cores: 2.0 is full)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def describe(info: dict[str, str]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in info.items())


def env_with_repo() -> dict[str, str]:
    """The environment for a child process that imports ``bridge``, ``bench`` and ``tests``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env
