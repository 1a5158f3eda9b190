"""An HTTP server on loopback serving documents with ETags, recording every request."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers import LOOPBACK

__all__ = ["Documents", "Request", "version_of"]


@dataclass(frozen=True, slots=True)
class Request:
    at: float
    """time.monotonic() when the request arrived."""
    replica: str
    """The X-Replica header ("?" when missing)."""
    name: str
    """The document (the URL path without the leading slash)."""


class Documents:
    """An HTTP server on loopback serving documents at ``/<name>``, with ETags.

    A document whose body is None answers 404. Every request is recorded.
    """

    def __init__(self) -> None:
        self.bodies: dict[str, bytes | None] = {}
        self.on_request: Callable[[Request], None] | None = None
        """Called (in the server's thread) with each request before it is answered."""
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Documents:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/{name}"

    def set(self, name: str, body: bytes | None) -> str | None:
        """Serve ``body`` at ``/<name>`` from now on; its version as events carry it."""
        self.bodies[name] = body
        return None if body is None else version_of(body)

    def requests(self, name: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if name is None or r.name == name]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        documents = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                request = Request(time.monotonic(), self.headers.get("X-Replica", "?"), name)
                with documents._lock:
                    documents._requests.append(request)
                if documents.on_request is not None:
                    documents.on_request(request)
                body = documents.bodies.get(name)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def version_of(body: bytes) -> str:
    """The version the bridge gives an HTTP body (``data.digest`` of its events)."""
    return "sha256:" + hashlib.sha256(body).hexdigest()
