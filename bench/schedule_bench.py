"""Schedules at realistic intervals: N HTTP sources polled every 10 s / 30 s, and the cost of
leader election with 1 and 3 replicas.

``python -m bench.schedule_bench`` (``--help``). A loopback nginx (or the asyncio server of
``bench.http_bench``) serves one document per source, 200 then 304. Each measured party runs in
a child process of its own (its CPU and RSS are its own):

* **bridge**: ``Bridge(config)`` of N ``http:`` sources at the interval (the service's own
  scheduler: phases spread by name, ramped first round, ``max_concurrent_polls``), a
  ``MemorySink``; with ``--replicas`` the same config plus ``leader_election`` on a Redis of
  its own, one child per replica;
* **reference**: N asyncio tasks, each with its own plain ``httpx.AsyncClient`` (default
  limits, so a 5 s keep-alive expiry; one SSL context shared by all), each polling its URL
  with ``If-None-Match`` on its own fixed-rate grid, the same phases; no concurrency bound.

Measured over a window that starts one interval after the start (the first round done; with
leader election two lease TTLs later, once the sharing settled):
schedule lag (how late each poll started after it was due) p50/p99, missed ticks, polls/s
against the N / interval expected, process CPU (% of one core), RSS per source, and the
connections nginx accepted per poll (``stub_status``; 0 = every poll reused a connection).
With leader election: Redis commands per source per second (``INFO commandstats``, commands
run inside scripts included) and leases lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO, Row, env_with_repo, percentile, rss_bytes, write_rows
from bench.http_bench import Server, http_server

NGINX_STATUS = "/__status"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def accepted(server: Server) -> int:
    """Connections nginx accepted so far (-1 without ``stub_status``)."""
    try:
        with urllib.request.urlopen(server.base_url + NGINX_STATUS, timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return -1
    return int(text.splitlines()[2].split()[0])


# -- the children ------------------------------------------------------------------------------


async def run_bridge(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.service.config import parse_config
    from bridge.service.runner import Bridge
    from bridge.state import MemoryStateStore

    urls = json.loads(Path(args.urls).read_text())
    raw: dict[str, Any] = {
        "broker": {"url": "nats://127.0.0.1:1"},  # never connected: a MemorySink
        "sources": [
            {"name": f"s{i:05d}", "interval": args.interval, "http": {"url": url}}
            for i, url in enumerate(urls)
        ],
    }
    if args.redis:
        raw["leader_election"] = {"redis_url": args.redis, "lease_ttl": args.lease_ttl}
    base_rss = rss_bytes()
    bridge = Bridge(parse_config(raw, env={}), sink=_discarding_sink(), state=MemoryStateStore(),
                    replica=args.replica)  # fmt: skip
    if args.transport == "aiohttp":
        await _use_aiohttp(bridge, args.interval)
    lags: list[tuple[float, float]] = []
    clock = asyncio.get_running_loop()
    bridge.lag.on_lag = lambda lag: lags.append((clock.time(), lag))
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    status = asyncio.create_task(_write_status(bridge, Path(args.status))) if args.status else None
    # The first round (the ramp); with leader election, also the sharing settled (every
    # replica joined, took its share and restored its checkpoints: a few periods).
    await asyncio.sleep(args.interval + (2 * args.lease_ttl if args.redis else 0.0))
    print("ready", flush=True)
    window_start, cpu0 = clock.time(), _cpu_s()
    steps0, missed0 = _steps(bridge), bridge.lag.missed
    lost0 = _lost(bridge)
    await asyncio.sleep(args.seconds)
    window = clock.time() - window_start
    cpu, steps, missed = _cpu_s() - cpu0, _steps(bridge) - steps0, bridge.lag.missed - missed0
    led = len(bridge.coordinator.led) if bridge.coordinator else len(urls)
    rss = rss_bytes()
    in_window = [lag for at, lag in lags if at >= window_start]
    result = {
        "polls": steps,
        "window_s": window,
        "cpu_s": cpu,
        "missed": missed,
        "lag_p50": percentile(in_window, 0.5) if in_window else 0.0,
        "lag_p99": percentile(in_window, 0.99) if in_window else 0.0,
        "rss_per_source": (rss - base_rss) / max(1, len(urls)),
        "led": led,
        "lost": _lost(bridge) - lost0,
    }
    if args.linger:  # the parent reads the figures, may kill a replica, then closes stdin
        print(json.dumps(result), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop_at = time.monotonic()
    stop.set()
    await task
    if status is not None:
        status.cancel()
    result["stop_s"] = time.monotonic() - stop_at
    return result


STATUS_EVERY_S = 0.5


async def _write_status(bridge: Any, path: Path) -> None:
    """Every STATUS_EVERY_S, a line ``{"t", "led", "polled"}``: the wall-clock time, the sources
    this replica leads and those of them its loop polled at least once (the parent's view of
    the sharing and of a failover)."""
    with path.open("a") as out:
        while True:
            coordinator = bridge.coordinator
            led = list(coordinator.led.values()) if coordinator is not None else []
            polled = sum(1 for one in led if one.loop.steps > 0)
            out.write(json.dumps({"t": time.time(), "led": len(led), "polled": polled}) + "\n")
            out.flush()
            await asyncio.sleep(STATUS_EVERY_S)


def _discarding_sink() -> Any:
    from bridge.sinks.memory import MemorySink

    class DiscardingSink(MemorySink):
        """Acknowledges every event and keeps none: a broker keeps them, not the bridge, so
        the RSS measured is the bridge's own."""

        async def publish(self, source_name: str, events: Any) -> None:
            self.publish_calls += 1

    return DiscardingSink()


async def _use_aiohttp(bridge: Any, interval_s: float) -> None:
    """Give the HTTP sources shared clients on httpx-aiohttp's transport, one per origin as the
    service's own (same limits and timeouts)."""
    import httpx
    from httpx_aiohttp import AiohttpTransport

    from bridge.sources.http import HttpPoller
    from bridge.sources.http_auth import origin
    from bridge.sources.http_clients import DEFAULT_TIMEOUT, http_limits

    limits = http_limits(interval_s, bridge.config.max_concurrent_polls)
    clients: dict[Any, httpx.AsyncClient] = {}
    for spec in bridge.specs:
        if isinstance(spec.source, HttpPoller):
            await spec.source.aclose()  # gives its shared client up
            key = origin(httpx.URL(spec.source.url))
            if key not in clients:
                transport = AiohttpTransport(limits=limits)
                clients[key] = httpx.AsyncClient(transport=transport, timeout=DEFAULT_TIMEOUT)
            spec.source.with_client(clients[key])  # closed with the process


def _steps(bridge: Any) -> int:
    if bridge.coordinator is not None:
        return sum(led.loop.steps for led in bridge.coordinator.led.values())
    return sum(loop.steps for loop in bridge.loops.values())


def _lost(bridge: Any) -> int:
    return bridge.coordinator.leases.lost if bridge.coordinator is not None else 0


async def run_reference(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from bridge.watching import start_offset_s

    urls: list[str] = json.loads(Path(args.urls).read_text())
    base_rss = rss_bytes()
    clock = asyncio.get_running_loop()
    lags: list[tuple[float, float]] = []
    polls = [0]
    missed = [0]
    shared = ssl.create_default_context()  # one for all: a context each costs ~0.4 MB
    clients = [httpx.AsyncClient(timeout=10.0, verify=shared) for _ in urls]
    start = clock.time()

    async def poll(i: int, url: str) -> None:
        client, etag = clients[i], ""
        anchor = start + start_offset_s(f"s{i:05d}", args.interval, len(urls))
        tick = 0
        while True:
            due = anchor + tick * args.interval
            await asyncio.sleep(max(0.0, due - clock.time()))
            lags.append((clock.time(), clock.time() - due))
            with contextlib.suppress(httpx.HTTPError):
                answer = await client.get(url, headers={"If-None-Match": etag} if etag else {})
                etag = answer.headers.get("etag", etag)
            polls[0] += 1
            now_tick = int((clock.time() - anchor) // args.interval) + 1
            missed[0] += max(0, now_tick - tick - 1)
            tick = max(tick + 1, now_tick)

    tasks = [asyncio.create_task(poll(i, u)) for i, u in enumerate(urls)]
    await asyncio.sleep(args.interval)
    print("ready", flush=True)
    window_start, cpu0, polls0, missed0 = clock.time(), _cpu_s(), polls[0], missed[0]
    await asyncio.sleep(args.seconds)
    window = clock.time() - window_start
    cpu, count = _cpu_s() - cpu0, polls[0] - polls0
    rss = rss_bytes()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.aclose()
    in_window = [lag for at, lag in lags if at >= window_start]
    return {
        "polls": count,
        "window_s": window,
        "cpu_s": cpu,
        "missed": missed[0] - missed0,
        "lag_p50": percentile(in_window, 0.5) if in_window else 0.0,
        "lag_p99": percentile(in_window, 0.99) if in_window else 0.0,
        "rss_per_source": (rss - base_rss) / max(1, len(urls)),
        "led": len(urls),
        "lost": 0,
        "stop_s": 0.0,
    }


# -- the parent --------------------------------------------------------------------------------


def _child(kind: str, urls_file: Path, args: argparse.Namespace, **extra: str) -> Any:
    command = [sys.executable, "-m", "bench.schedule_bench", "--child", kind]
    command += ["--urls", str(urls_file), "--interval", str(args.interval)]
    command += ["--seconds", str(args.seconds), "--lease-ttl", str(args.lease_ttl)]
    for key, value in extra.items():
        command += [f"--{key}", value]
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env=env_with_repo(),
    )  # fmt: skip


def _result(proc: Any, limit_s: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=limit_s)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _reuse(result: dict[str, Any]) -> float:
    """Polls in the window that did not open a connection (nginx's accepted count)."""
    accepted_: float = result["accepted"]
    polls: float = result["polls"]
    if accepted_ < 0:
        return float("nan")
    return 1.0 - accepted_ / max(1.0, polls)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    sys.path.insert(0, str(REPO))
    from tests.support.servers import RedisServer

    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.close()


async def _commands(url: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    finally:
        await client.aclose()


def measure(args: argparse.Namespace, work: Path) -> list[Row]:
    rows: list[Row] = []
    with http_server(args.server, args.sources) as server:
        urls_file = work / "urls.json"
        urls_file.write_text(json.dumps(server.urls()))
        if not args.election_only:
            rows += single_rows(args, server, urls_file)
        for replicas in args.replicas:
            rows += election_rows(args, work, urls_file, replicas)
    return rows


def single_rows(args: argparse.Namespace, server: Server, urls_file: Path) -> list[Row]:
    """One bridge process, then the plain-httpx reference, without leader election."""
    rows: list[Row] = []
    limit_s = args.interval + args.seconds + 120
    expected = args.sources / args.interval
    results: dict[str, dict[str, Any]] = {}
    for kind in ("reference", "bridge"):
        proc = _child(kind, urls_file, args)
        proc.stdout.readline()  # its first round done: the window starts
        before = accepted(server)
        results[kind] = _result(proc, limit_s)
        results[kind]["accepted"] = accepted(server) - before
    ref, got = results["reference"], results["bridge"]
    for r in results.values():
        r["rate"] = r["polls"] / r["window_s"]
        r["cpu_pct"] = 100 * r["cpu_s"] / r["window_s"]
    n = args.sources
    values = {f"bridge_{k}": float(v) for k, v in got.items()}
    values.update({f"ref_{k}": float(v) for k, v in ref.items()})
    rows.append(
        Row(
            "schedule",
            f"{n:,} HTTP sources every {args.interval:g} s: lag p99",
            f"{got['lag_p99'] * 1e3:,.0f} ms (p50 {got['lag_p50'] * 1e3:,.0f})",
            f"plain httpx {ref['lag_p99'] * 1e3:,.0f} ms (p50 {ref['lag_p50'] * 1e3:,.0f})",
            got["lag_p99"] / max(ref["lag_p99"], 1e-3),
            "p99 <= 1 s, 0 missed",
            got["lag_p99"] <= 1.0 and got["missed"] == 0,
            f"polls/s {got['rate']:,.1f} of {expected:,.1f} expected (plain httpx "
            f"{ref['rate']:,.1f}); missed ticks {got['missed']} (plain {ref['missed']}); "
            f"CPU {got['cpu_pct']:.1f} % of a core (plain {ref['cpu_pct']:.1f} %); "
            f"connection reuse {_reuse(got):.1%} of polls (plain {_reuse(ref):.1%}); "
            f"stop took {got['stop_s']:.1f} s",
            values,
        )
    )
    rows.append(
        Row(
            "schedule",
            f"{n:,} HTTP sources every {args.interval:g} s: RSS per source",
            f"{got['rss_per_source'] / 1024:,.1f} KiB",
            f"plain httpx {ref['rss_per_source'] / 1024:,.1f} KiB",
            got["rss_per_source"] / max(ref["rss_per_source"], 1.0),
            "<= 25 KiB",
            got["rss_per_source"] <= 25 * 1024,
            f"CPU per 1,000 sources: {got['cpu_pct'] * 1000 / n:.2f} % of a core "
            f"(plain {ref['cpu_pct'] * 1000 / n:.2f} %)",
        )
    )
    return rows


def election_rows(
    args: argparse.Namespace, work: Path, urls_file: Path, replicas: int
) -> list[Row]:
    """``replicas`` bridge processes with leader election on one Redis: Redis commands per
    source per second, leases lost, schedule figures over the window, the time until every
    source had a leader; with ``args.failover``, then one replica SIGKILLed and the time until
    every source it led was polled by a survivor."""
    n, ttl = args.sources, args.lease_ttl
    expected = n / args.interval
    limit_s = args.interval + 2 * ttl + args.seconds + 120
    statuses = [work / f"status-{replicas}-r{r}.jsonl" for r in range(replicas)]
    with redis_server() as redis_url:
        launched = time.time()
        procs = [
            _child(
                "bridge",
                urls_file,
                args,
                redis=redis_url,
                replica=f"r{r}",
                status=str(path),
                linger="1",
            )
            for r, path in enumerate(statuses)
        ]
        for proc in procs:  # every replica past its warm-up
            proc.stdout.readline()
        before, at = asyncio.run(_commands(redis_url)), time.monotonic()
        time.sleep(args.seconds * 0.8)
        per_s = (asyncio.run(_commands(redis_url)) - before) / (time.monotonic() - at)
        outs = [_lingering_result(p, limit_s) for p in procs]
        failover_s: float | None = None
        if args.failover and replicas > 1:
            procs[0].kill()
            killed = time.time()
            failover_s = _all_polled_again(statuses[1:], n, killed, ttl + args.interval + 60)
        for proc in procs:
            proc.stdin.close()  # a lingering child stops
            proc.wait(limit_s)
            proc.stdout.close()
    first = [_series(path)[0]["t"] for path in statuses]  # each replica's first status line
    leased_at = _all_led_at([_series(path) for path in statuses], n)
    leased_s = leased_at - min(first) if leased_at is not None else None
    led = sum(o["led"] for o in outs)
    lost = sum(o["lost"] for o in outs)
    rate = sum(o["polls"] / o["window_s"] for o in outs)
    p99 = max(o["lag_p99"] for o in outs)
    p50 = max(o["lag_p50"] for o in outs)
    missed = sum(o["missed"] for o in outs)
    cpu = sum(100 * o["cpu_s"] / o["window_s"] for o in outs)
    rss = sum(o["rss_per_source"] for o in outs) / replicas  # each child's RSS / all N sources
    per_source = per_s / n
    window = min(o["window_s"] for o in outs)
    rows = [
        Row(
            "schedule",
            f"{n:,} sources every {args.interval:g} s, leader election, {replicas} replica(s): "
            "Redis commands",
            f"{per_source:.4f} /source/s",
            f"target 0.05 /source/s ({per_s:,.1f} commands/s in all)",
            per_source / 0.05,
            "<= 0.05 /source/s, 0 lost",
            per_source <= 0.05 and lost == 0 and led == n,
            f"over {window:,.0f} s: led {led} of {n}; leases lost {lost}; polls/s {rate:,.1f} "
            f"of {expected:,.1f}; lag p99 {p99 * 1e3:,.0f} ms (p50 {p50 * 1e3:,.0f}, worst "
            f"replica); missed ticks {missed}; CPU {cpu:.1f} % of a core (all replicas); RSS "
            f"{rss / 1024:,.1f} KiB per source and replica",
            {
                "commands_per_s": per_s,
                "led": led,
                "lost": lost,
                "rate": rate,
                "lag_p99": p99,
                "missed": missed,
            },
        ),
        Row(
            "schedule",
            f"{n:,} sources, {replicas} replica(s): every source leased",
            "never" if leased_s is None else f"{leased_s:,.1f} s after the first start",
            f"2 x lease_ttl = {2 * ttl:g} s",
            (leased_s if leased_s is not None else float("inf")) / (2 * ttl),
            "<= 2 x lease_ttl",
            leased_s is not None and leased_s <= 2 * ttl,
            ""
            if leased_at is None
            else f"{leased_at - launched:,.1f} s after launching the processes (imports and "
            f"configs of all sources included); the replicas started {max(first) - min(first):,.1f}"
            " s apart",
        ),
    ]
    if args.failover and replicas > 1:
        limit = ttl + args.interval
        rows.append(
            Row(
                "schedule",
                f"{n:,} sources, {replicas} replicas: SIGKILL one -> all its sources polled again",
                "never" if failover_s is None else f"{failover_s:,.1f} s",
                f"lease_ttl + interval = {limit:g} s",
                (failover_s if failover_s is not None else float("inf")) / limit,
                "<= lease_ttl + interval",
                failover_s is not None and failover_s <= limit,
                f"the killed replica led {outs[0]['led']} sources; the time is until the "
                "survivors lead all and polled each at least once",
            )
        )
    return rows


def _lingering_result(proc: Any, limit_s: float) -> dict[str, Any]:
    """The figures a lingering child prints before it waits for its stdin to close."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child ended (exit code {proc.wait()}) without its figures")
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError("child gave no figures in time")


def _series(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _all_led_at(series: list[list[dict[str, Any]]], n: int) -> float | None:
    """The first time every source had a leader (the replicas' latest counts summed)."""
    latest = [0] * len(series)
    events = sorted((point["t"], i, point["led"]) for i, one in enumerate(series) for point in one)
    for t, i, led in events:
        latest[i] = led
        if sum(latest) >= n:
            return float(t)
    return None


def _all_polled_again(statuses: list[Path], n: int, killed: float, limit_s: float) -> float | None:
    """Seconds from ``killed`` until the survivors lead every source and polled each once."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(STATUS_EVERY_S)
        last = [series[-1] for series in map(_series, statuses) if series]
        fresh = len(last) == len(statuses) and all(p["t"] > killed for p in last)
        if fresh and sum(p["led"] for p in last) >= n and sum(p["polled"] for p in last) >= n:
            return float(max(p["t"] for p in last)) - killed
    return None


STACKS = (("asyncio", "httpx"), ("asyncio", "aiohttp"), ("uvloop", "httpx"))


def stack_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    """The bridge on each HTTP stack, one after the other: CPU per poll and lag p99."""
    limit_s = args.interval + args.seconds + 120
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with http_server(args.server, args.sources) as server:
        urls_file = work / "urls.json"
        urls_file.write_text(json.dumps(server.urls()))
        for loop, transport in STACKS:
            proc = _child("bridge", urls_file, args, loop=loop, transport=transport)
            proc.stdout.readline()
            results[loop, transport] = _result(proc, limit_s)
    base = results[STACKS[0]]
    base_us = 1e6 * base["cpu_s"] / max(1, base["polls"])
    rows = []
    for (loop, transport), r in results.items():
        us = 1e6 * r["cpu_s"] / max(1, r["polls"])
        rows.append(
            Row(
                "schedule",
                f"HTTP stack {loop} + {transport}: CPU per poll ({args.sources:,} sources, "
                f"every {args.interval:g} s)",
                f"{us:,.0f} us/poll",
                f"asyncio + httpx {base_us:,.0f} us/poll",
                us / base_us,
                "",
                None,
                f"lag p99 {r['lag_p99'] * 1e3:,.0f} ms; polls/s "
                f"{r['polls'] / r['window_s']:,.1f}; missed {r['missed']}",
                {"cpu_per_poll_us": us, "lag_p99": r["lag_p99"]},
            )
        )
    return rows


def run_rows(
    *,
    sources: int = 2000,
    interval: float = 10.0,
    seconds: float = 30.0,
    replicas: Sequence[int] = (1, 3),
    server: str = "auto",
    lease_ttl: float = 10.0,
    failover: bool = False,
    election_only: bool = False,
) -> list[Row]:
    import tempfile

    args = argparse.Namespace(
        sources=sources, interval=interval, seconds=seconds, replicas=list(replicas),
        server=server, lease_ttl=lease_ttl, failover=failover, election_only=election_only,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="koprs-bench-schedule-") as tmp:
        return measure(args, Path(tmp))


def run_sets(sets: Sequence[dict[str, Any]]) -> list[Row]:
    """:func:`run_rows` for each set of options (``make bench``: several N and intervals)."""
    return [row for options in sets for row in run_rows(**options)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sources", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring window")
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 3])
    parser.add_argument("--server", choices=["auto", "nginx", "asyncio"], default="auto")
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    parser.add_argument(
        "--failover", action="store_true",
        help="after the window, SIGKILL one replica and time until its sources are polled again",
    )  # fmt: skip
    parser.add_argument(
        "--election-only", action="store_true", help="only the leader-election rows"
    )
    parser.add_argument("--status", default="", help=argparse.SUPPRESS)
    parser.add_argument("--linger", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", type=Path)
    parser.add_argument("--child", choices=["bridge", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    parser.add_argument("--redis", default="", help=argparse.SUPPRESS)
    parser.add_argument("--replica", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--transport", choices=["httpx", "aiohttp"], default="httpx")
    parser.add_argument(
        "--stacks", action="store_true", help="compare asyncio/uvloop x httpx/httpx-aiohttp"
    )
    args = parser.parse_args(argv)
    if args.child:
        run = run_bridge if args.child == "bridge" else run_reference
        if args.loop == "uvloop":
            import uvloop

            print(json.dumps(uvloop.run(run(args))))
        else:
            print(json.dumps(asyncio.run(run(args))))
        return 0
    if args.stacks:
        import tempfile

        from bench.common import format_table

        with tempfile.TemporaryDirectory(prefix="koprs-bench-schedule-") as tmp:
            rows = stack_rows(args, Path(tmp))
        print(format_table(rows))
        for row in rows:
            print(f"  {row.name}: {row.note}")
        return 0
    from bench.common import format_table

    rows = run_rows(
        sources=args.sources, interval=args.interval, seconds=args.seconds,
        replicas=args.replicas, server=args.server, lease_ttl=args.lease_ttl,
        failover=args.failover, election_only=args.election_only,
    )  # fmt: skip
    print(format_table(rows))
    for row in rows:
        if row.note:
            print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
