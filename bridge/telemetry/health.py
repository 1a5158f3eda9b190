"""The operations HTTP server: ``/healthz``, ``/readyz``, ``/metrics``.

A minimal HTTP/1.1 server on :func:`asyncio.start_server` (one request per connection, GET
and HEAD only), so the bridge needs no web framework:

* ``/healthz``: 200 while the process runs (its event loop answers).
* ``/readyz``: 200 when every readiness check passes, else 503; the JSON body names each
  check and what is not ready: ``{"ready": false, "checks": {"config": true, "broker": false},
  "not_ready": ["broker"]}``. Each check is bounded by a timeout (a hung dependency is not
  ready).
* ``/metrics``: the Prometheus text format (the checks run first, so the connection gauges
  are current).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from bridge.telemetry.metrics import Metrics

__all__ = ["HealthServer", "Readiness"]

log = logging.getLogger("bridge.telemetry")

Check = Callable[[], Awaitable[bool]]
_REQUEST_TIMEOUT_S = 10.0
_MAX_REQUEST_BYTES = 16 * 1024
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Readiness:
    """Named asynchronous checks; ready when all pass."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self.checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def evaluate(self) -> dict[str, bool]:
        """Run every check (concurrently, each within ``timeout_s``); an error is a failure."""
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(self.checks[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def _run(self, check: Check) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await check())
        except Exception as exc:
            log.debug("readiness check failed: %s", exc)
            return False


class HealthServer:
    """Serves the three endpoints on ``host:port`` (port 0: a free one, see :attr:`port`)."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        metrics: Metrics | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.readiness = readiness
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the health server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.requested_port, limit=_MAX_REQUEST_BYTES
        )
        log.info(
            "serving /healthz, /readyz%s on %s", ", /metrics" if self.metrics else "", self.url
        )

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                await self._exchange(reader, writer)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        except Exception:
            log.exception("health server: request failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return
        method, target, _version = parts
        path = target.split("?", 1)[0]
        status, content_type, body = await self._respond(method, path)
        reason = _REASONS.get(status, "")
        headers = (
            f"HTTP/1.1 {status} {reason}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n"
        )
        if status == 405:
            headers += "Allow: GET, HEAD\r\n"
        writer.write(headers.encode("latin-1") + b"\r\n")
        if method != "HEAD":
            writer.write(body)
        await writer.drain()

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/healthz", "/readyz", "/metrics") or (
            path == "/metrics" and self.metrics is None
        ):
            return 404, "application/json", _json({"error": f"no such endpoint: {path}"})
        if method not in ("GET", "HEAD"):
            return 405, "application/json", _json({"error": f"method {method} not allowed"})
        if path == "/healthz":
            return 200, "application/json", _json({"status": "alive"})
        checks = await self.readiness.evaluate()
        if path == "/metrics":
            assert self.metrics is not None
            return 200, CONTENT_TYPE_LATEST, self.metrics.render()
        not_ready = [name for name, ok in checks.items() if not ok]
        document = {"ready": not not_ready, "checks": checks, "not_ready": not_ready}
        return (503 if not_ready else 200), "application/json", _json(document)


def _json(document: object) -> bytes:
    return json.dumps(document).encode() + b"\n"
