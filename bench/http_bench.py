"""HTTP polling capacity: many ``HttpPoller`` sources against a plain httpx loop, same server.

``python -m bench.http_bench`` (``--help``). A loopback HTTP server (nginx from the OS when
installed, else a minimal asyncio server in its own process) serves one small JSON document per
source and answers a matching ``If-None-Match`` with 304. Measured, in this order:

* **server capacity**: a raw-socket client (asyncio protocols, no HTTP library) in a child
  process, on as many keep-alive connections as there are sources, sending the same
  conditional GETs: the server's rate is at least this, to show it is not the bottleneck;
* **bridge**: the sources built by the service's own ``Bridge(config)`` from a config of N
  ``http:`` sources (so each has the client ``build_source`` makes: an ``httpx.AsyncClient``
  shared with up to 31 other sources to the origin, 10 s timeout, 5 s connect), each driven
  by a ``SourceLoop`` as ``Bridge`` starts them (``SourceLoop.run()`` tasks, the bridge's
  telemetry hooks, a ``MemorySink`` and a ``MemoryStateStore``), interval 1 ms so that every
  source is always due: the loops poll as fast as they can. Polls/s = completed
  ``SourceLoop`` steps per second, counted over a window once every source answered 304 at
  least once;
* **raw**: N asyncio tasks, each with its own ``httpx.AsyncClient`` (same timeouts; one shared
  SSL context), each looping ``GET`` with ``If-None-Match`` and reading the response: the same
  requests with the same concurrency, without the bridge.

Rounds alternate raw and bridge (the best window of each counts). The ratio is bridge / raw
(target >= 0.7). Memory per configured source: RSS and tracemalloc growth of building the
``Bridge`` (every source configured, nothing polled yet), per source, against building the raw
loop's clients; after the run, RSS growth with every source connected and polled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO, Row, env_with_repo, rss_bytes, trim_heap, write_rows

LOOPBACK = "127.0.0.1"
TARGET = 0.7
INTERVAL = "1ms"  # every source always due: the loops poll back to back

# -- the servers -----------------------------------------------------------------------------

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    open_file_cache max=20000 inactive=600s;
    open_file_cache_valid 600s;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    default_type application/json;
    server {{
        listen {host}:{port} backlog=4096;
        root {work}/www;
        location = /__status {{ stub_status; }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1.0):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}")
        time.sleep(0.02)


@dataclass
class Server:
    kind: str
    base_url: str
    paths: list[str]

    def urls(self) -> list[str]:
        return [self.base_url + p for p in self.paths]


@contextlib.contextmanager
def http_server(kind: str, count: int) -> Iterator[Server]:
    """``count`` documents at ``/s/<i>.json``, served by nginx or the asyncio server."""
    if kind == "auto":
        kind = "nginx" if nginx_binary() else "asyncio"
    port = free_port()
    paths = [f"/s/{i:05d}.json" for i in range(count)]
    work = Path(tempfile.mkdtemp(prefix="koprs-bench-http-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        if kind == "nginx":
            binary = nginx_binary()
            if binary is None:
                raise RuntimeError("nginx not found")
            (work / "www" / "s").mkdir(parents=True)
            (work / "tmp").mkdir()
            for i, path in enumerate(paths):
                (work / "www" / path.lstrip("/")).write_text(f'{{"source": {i}}}\n')
            conf = work / "nginx.conf"
            conf.write_text(_NGINX_CONF.format(work=work, host=LOOPBACK, port=port))
            command = [binary, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]
        else:
            command = [sys.executable, "-m", "bench.http_bench", "--serve", str(port)]
        with (work / "server.log").open("wb") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env=env_with_repo(),
            )  # fmt: skip
        _wait_listening(port, proc, kind)
        yield Server(kind, f"http://{LOOPBACK}:{port}", paths)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


_OK = (
    b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nContent-Type: application/json\r\n'
    b'Content-Length: 9\r\n\r\n{"v": 1}\n'
)
_NOT_MODIFIED = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'


class _Answer(asyncio.Protocol):
    """Every request gets the same document; a matching ``If-None-Match`` gets 304."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4 :]
            out.append(_NOT_MODIFIED if b'if-none-match: "v1"' in head else _OK)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Answer, LOOPBACK, port, backlog=4096)
    async with server:
        await server.serve_forever()


# -- the server's capacity: a raw-socket client ------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive connection sending conditional GETs back to back."""

    def __init__(self, host: str, path: str, counter: list[int]) -> None:
        self.host = host.encode()
        self.path = path.encode()
        self.counter = counter
        self.buffer = b""
        self.etag = b""
        self.transport: asyncio.Transport | None = None

    def _send(self) -> None:
        assert self.transport is not None
        validator = b"If-None-Match: " + self.etag + b"\r\n" if self.etag else b""
        self.transport.write(
            b"GET " + self.path + b" HTTP/1.1\r\nHost: " + self.host + b"\r\n" + validator + b"\r\n"
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"etag":
                    self.etag = value.strip()
            if head.startswith(b"HTTP/1.1 304"):
                length = 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.counter[0] += 1
            self._send()


_CONNECT_BATCH = 200


def _same(client: _Client) -> _Client:
    return client


async def load(base_url: str, paths: Sequence[str], connections: int, seconds: float) -> float:
    """Responses per second the server gave a raw client on ``connections`` connections."""
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    loop = asyncio.get_running_loop()
    counter = [0]
    transports: list[asyncio.BaseTransport] = []
    authority = f"{host}:{port}"

    async def connect(i: int) -> None:
        client = _Client(authority, paths[i % len(paths)], counter)
        with contextlib.suppress(OSError, TimeoutError):  # counted out, not waited for
            transport, _ = await asyncio.wait_for(
                loop.create_connection(functools.partial(_same, client), host, port), 5.0
            )
            transports.append(transport)

    # Connect in batches: thousands of connects at once, on a busy machine, overflow the
    # listen backlog and each lost SYN waits for its retransmission (1 s, 3 s, 7 s...); one by
    # one, connections made early flood the server while later ones wait. Either hung here.
    for start in range(0, connections, _CONNECT_BATCH):
        batch = range(start, min(connections, start + _CONNECT_BATCH))
        await asyncio.gather(*(connect(i) for i in batch))
    await asyncio.sleep(min(1.0, seconds / 4))  # warm up: every connection has its ETag
    start_count, started = counter[0], time.perf_counter()
    await asyncio.sleep(seconds)
    rate = (counter[0] - start_count) / (time.perf_counter() - started)
    for transport in transports:
        transport.close()
    return rate


def server_capacity(server: Server, connections: int, seconds: float) -> float:
    """Run :func:`load` in a child process (a CPU of its own, if there is one free)."""
    command = [sys.executable, "-m", "bench.http_bench", "--load", server.base_url]
    command += ["--sources", str(len(server.paths)), "--connections", str(connections)]
    command += ["--seconds", str(seconds)]
    try:  # bounded: a capacity that cannot be measured is reported, not waited for
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, env=env_with_repo(), check=False,
            timeout=seconds + 60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return float("nan")
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    rate: float = json.loads(done.stdout.strip().splitlines()[-1])["rate"]
    return rate


# -- the bridge and the raw loop -----------------------------------------------------------------


def bridge_config(urls: Sequence[str]) -> Any:
    from bridge.service.config import parse_config

    raw = {
        "broker": {"url": "nats://127.0.0.1:4222"},  # never connected: the sink is a MemorySink
        "sources": [
            {"name": f"s{i:05d}", "interval": INTERVAL, "http": {"url": url}}
            for i, url in enumerate(urls)
        ],
    }
    return parse_config(raw, origin="<bench>")


@dataclass
class Window:
    polls: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.polls / self.seconds


async def _window(counts: Any, warm: Any, seconds: float, warm_timeout: float) -> Window:
    """Wait until ``warm()``, then count ``counts()`` over ``seconds``."""
    deadline = time.monotonic() + warm_timeout
    while not warm():
        if time.monotonic() > deadline:
            raise RuntimeError("the sources did not all answer within the warm-up time")
        await asyncio.sleep(0.05)
    before, start = counts(), time.perf_counter()
    await asyncio.sleep(seconds)
    return Window(counts() - before, time.perf_counter() - start)


async def bridge_window(bridge: Any, seconds: float, warm_timeout: float) -> Window:
    """Every source of ``bridge`` in a ``SourceLoop``, as ``Bridge`` starts them."""
    from bridge.service.delivery import SourceLoop

    loops = [
        SourceLoop(spec, bridge.sink, bridge.state, telemetry=bridge.telemetry.source(spec.name))
        for spec in bridge.specs
    ]
    first = [loop.steps for loop in loops]
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    try:
        return await _window(
            lambda: sum(loop.steps for loop in loops),
            lambda: all(loop.steps >= f + 2 for loop, f in zip(loops, first, strict=True)),
            seconds,
            warm_timeout,
        )
    finally:
        for loop, task in zip(loops, tasks, strict=True):
            loop.stop()
            if not loop.busy:
                task.cancel()
        await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RawPollers:
    """N httpx clients (one per URL, as the service has), each in its own polling task."""

    def __init__(self, urls: Sequence[str]) -> None:
        context = ssl.create_default_context()  # shared: httpx would load one per client
        timeout = httpx.Timeout(10.0, connect=5.0)
        self.urls = list(urls)
        self.clients = [
            httpx.AsyncClient(timeout=timeout, verify=context, follow_redirects=False) for _ in urls
        ]
        self.etags: list[str | None] = [None] * len(urls)
        self.polls = [0] * len(urls)
        self.not_modified = 0

    async def _poll(self, i: int) -> None:
        client, url = self.clients[i], self.urls[i]
        while True:
            etag = self.etags[i]
            headers = {"If-None-Match": etag} if etag else {}
            response = await client.get(url, headers=headers)
            if response.status_code == 304:
                self.not_modified += 1
            elif response.status_code == 200:
                self.etags[i] = response.headers.get("etag")
            else:
                raise RuntimeError(f"GET {url}: HTTP {response.status_code}")
            self.polls[i] += 1

    async def window(self, seconds: float, warm_timeout: float) -> Window:
        first = list(self.polls)
        tasks = [asyncio.create_task(self._poll(i)) for i in range(len(self.urls))]
        try:
            return await _window(
                lambda: sum(self.polls),
                lambda: all(p >= f + 2 for p, f in zip(self.polls, first, strict=True)),
                seconds,
                warm_timeout,
            )
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                raise RuntimeError(f"raw loop: {len(errors)} task(s) failed: {errors[0]!r}")

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


@dataclass
class Built:
    rss: int
    traced: int
    seconds: float


@contextlib.contextmanager
def measured() -> Iterator[Built]:
    """RSS and tracemalloc growth (and time) of what the block builds."""
    trim_heap()
    result = Built(0, 0, 0.0)
    rss0 = rss_bytes()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        result.traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        trim_heap()
        result.rss = rss_bytes() - rss0


async def measure(
    server: Server, *, seconds: float, rounds: int, capacity_s: float
) -> dict[str, float]:
    from bridge.service.runner import Bridge
    from bridge.sinks.memory import MemorySink
    from bridge.state import MemoryStateStore

    urls = server.urls()
    n = len(urls)
    warm_timeout = 60.0 + n / 20
    result: dict[str, float] = {"sources": n}
    print(f"http: server capacity ({server.kind}, {n} connections) ...", flush=True)
    result["server_rps"] = server_capacity(server, n, capacity_s)
    config = bridge_config(urls)
    # One of each first, untimed, so that what is built once (imports, caches) is not counted.
    throwaway = RawPollers(urls[:1])
    await throwaway.aclose()
    for spec in Bridge(bridge_config(urls[:1]), sink=MemorySink()).specs:
        await spec.source.aclose()  # type: ignore[attr-defined]
    with measured() as raw_built:
        raw = RawPollers(urls)
    print(f"http: building the bridge's {n} sources ...", flush=True)
    rss_before_bridge = rss_bytes()
    with measured() as bridge_built:
        sink = MemorySink()
        bridge = Bridge(config, sink=sink, state=MemoryStateStore())
    result.update(
        raw_rss=raw_built.rss / n,
        raw_traced=raw_built.traced / n,
        bridge_rss=bridge_built.rss / n,
        bridge_traced=bridge_built.traced / n,
        bridge_build_s=bridge_built.seconds,
    )
    best_raw = best_bridge = 0.0
    try:
        for r in range(rounds):
            print(f"http: round {r + 1}/{rounds}: raw ...", flush=True)
            raw_window = await raw.window(seconds, warm_timeout)
            best_raw = max(best_raw, raw_window.rate)
            print(f"http: round {r + 1}/{rounds}: bridge ...", flush=True)
            bridge_window_ = await bridge_window(bridge, seconds, warm_timeout)
            best_bridge = max(best_bridge, bridge_window_.rate)
            print(
                f"http: round {r + 1}: raw {raw_window.rate:,.0f}/s, "
                f"bridge {bridge_window_.rate:,.0f}/s",
                flush=True,
            )
        trim_heap()
        result["bridge_running_rss"] = (rss_bytes() - rss_before_bridge) / n
        published = sink.count()
        if published != n:  # one Added per source, then only 304s
            raise RuntimeError(f"bridge published {published} events, expected {n}")
    finally:
        await raw.aclose()
        for spec in bridge.specs:
            with contextlib.suppress(Exception):
                await spec.source.aclose()  # type: ignore[attr-defined]
    result.update(raw_rate=best_raw, bridge_rate=best_bridge, window_s=seconds)
    return result


def rows_of(m: dict[str, float], server_kind: str) -> list[Row]:
    n = int(m["sources"])
    ratio = m["bridge_rate"] / m["raw_rate"]
    headroom = m["server_rps"] / max(m["bridge_rate"], m["raw_rate"])
    return [
        Row(
            "http",
            f"{n:,} sources, polls/s (304)",
            f"{m['bridge_rate']:,.0f} polls/s",
            f"raw httpx {m['raw_rate']:,.0f}/s",
            ratio,
            f"ratio >= {TARGET}",
            ratio >= TARGET,
            f"server ({server_kind}) answers >= {m['server_rps']:,.0f} req/s to a raw-socket "
            f"client: {headroom:.1f}x the faster loop",
            m,
        ),
        Row(
            "http",
            f"memory per configured source ({n:,})",
            f"{m['bridge_rss'] / 1024:,.0f} KiB RSS",
            f"raw httpx client {m['raw_rss'] / 1024:,.1f} KiB",
            m["bridge_rss"] / max(m["raw_rss"], 1.0),
            "",
            None,
            f"tracemalloc {m['bridge_traced'] / 1024:,.1f} KiB vs {m['raw_traced'] / 1024:,.1f};"
            f" building took {m['bridge_build_s'] / n * 1e3:.1f} ms/source; "
            f"after polling: {m['bridge_running_rss'] / 1024:,.0f} KiB RSS/source",
            m,
        ),
    ]


def run_rows(
    *,
    sources: int = 2000,
    seconds: float = 10.0,
    rounds: int = 2,
    server: str = "auto",
    capacity_s: float = 5.0,
) -> list[Row]:
    with http_server(server, sources) as srv:
        measured_ = asyncio.run(measure(srv, seconds=seconds, rounds=rounds, capacity_s=capacity_s))
        return rows_of(measured_, srv.kind)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sources", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window")
    parser.add_argument("--rounds", type=int, default=2, help="raw/bridge rounds, best counts")
    parser.add_argument("--server", choices=["auto", "nginx", "asyncio"], default="auto")
    parser.add_argument("--capacity-seconds", type=float, default=5.0)
    parser.add_argument("--rows-json", type=Path, help="write the rows to this file")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the asyncio server
    parser.add_argument("--load", help=argparse.SUPPRESS)  # the raw-socket load generator
    parser.add_argument("--connections", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.serve))
        return 0
    if args.load:
        paths = [f"/s/{i:05d}.json" for i in range(args.sources)]
        rate = asyncio.run(load(args.load, paths, args.connections, args.seconds))
        print(json.dumps({"rate": rate}))
        return 0
    from bench.common import format_table

    rows = run_rows(
        sources=args.sources,
        seconds=args.seconds,
        rounds=args.rounds,
        server=args.server,
        capacity_s=args.capacity_seconds,
    )
    print(format_table(rows))
    for row in rows:
        if row.note:
            print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
