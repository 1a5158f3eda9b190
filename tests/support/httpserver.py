"""HTTP servers on 127.0.0.1 for the HTTP poller's tests.

::

    HttpTestServer      scriptable: each path answered by a responder; a Document responder
    Documents           an HttpTestServer serving named documents with ETags (e2e, HA, chaos)
    StaticFileServer    Python's SimpleHTTPRequestHandler: files, Last-Modified, no ETag
    NginxServer         nginx from the OS package: files with ETag and Last-Modified


``HttpTestServer`` runs ``http.server.ThreadingHTTPServer`` in a background thread. Each path
is served by a *responder*, a function from the :class:`Exchange` received to a :class:`Reply`;
:class:`Document` is a responder that behaves like a well-mannered origin (ETag and/or
Last-Modified, 304 on a matching conditional request) and whose content tests change between
polls. Every request is recorded with its headers and the status it got, so tests assert what
the client sent (``If-None-Match``, ``Authorization``, ...), not only what it did.

The static servers compute their validators themselves (from the file's mtime and size), so
they check the poller against behaviour this project did not write. Every server records what
it received: ``HttpTestServer`` and ``StaticFileServer`` in ``exchanges``, nginx through its
access log (:meth:`NginxServer.exchanges`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from tests.support.servers import free_port

__all__ = [
    "Document",
    "Documents",
    "Exchange",
    "HttpTestServer",
    "NginxServer",
    "Reply",
    "Responder",
    "StaticFileServer",
    "nginx_binary",
    "version_of",
]

LOOPBACK = "127.0.0.1"


@dataclass
class Exchange:
    """One request as the server received it, and the status it answered."""

    method: str
    path: str
    headers: Mapping[str, str]
    """Header names in lower case."""
    status: int = 0
    connection: int = 0
    """The client's port: requests with the same value came over one connection."""
    at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when the request arrived."""


@dataclass
class Reply:
    """What to answer. ``chunks`` (instead of ``body``) sends ``Transfer-Encoding: chunked``
    with no ``Content-Length``, the chunks produced lazily (so a reply may be huge)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: Iterable[bytes] | None = None


Responder = Callable[[Exchange], Reply]


class Document:
    """A resource with mutable content that answers conditional GETs as an origin should.

    ``If-None-Match`` is compared with the ETag (weak comparison, ``*`` matches); without it,
    ``If-Modified-Since`` is compared with Last-Modified as a string (tests use fixed dates).
    ``status`` other than 200 answers that status with an empty body.
    """

    def __init__(
        self,
        body: bytes = b"",
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        content_type: str | None = "application/json",
        status: int = 200,
    ) -> None:
        self.body = body
        self.etag = etag
        self.last_modified = last_modified
        self.content_type = content_type
        self.status = status

    def __call__(self, exchange: Exchange) -> Reply:
        if self.status != 200:
            return Reply(self.status)
        headers: dict[str, str] = {}
        if self.content_type:
            headers["Content-Type"] = self.content_type
        if self.etag:
            headers["ETag"] = self.etag
        if self.last_modified:
            headers["Last-Modified"] = self.last_modified
        if_none_match = exchange.headers.get("if-none-match")
        if if_none_match is not None:
            tags = {_weak(tag) for tag in if_none_match.split(",")}
            if self.etag and ("*" in tags or _weak(self.etag) in tags):
                return Reply(304, headers=headers)
        elif self.last_modified and exchange.headers.get("if-modified-since") == self.last_modified:
            return Reply(304, headers=headers)
        return Reply(200, self.body, headers)


def _weak(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that stops reading (the poller enforcing its body cap, or timing out) breaks
        # the connection: expected here, so not printed. Anything else is.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _BackgroundServer:
    """A ``ThreadingHTTPServer`` on a free loopback port, served from a daemon thread."""

    def __init__(
        self, handler: type[http.server.BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
    ) -> None:
        self._server = _Server((LOOPBACK, 0), handler)
        if tls is not None:  # HTTPS: the handshake happens in accept(); a failed one is dropped
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self.base_url = f"{'https' if tls else 'http'}://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},  # how soon close() returns
            name=f"http-test-server-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class HttpTestServer(_BackgroundServer):
    """``with HttpTestServer() as server: url = server.route("/x", Document(b"..."))``.

    ``tls``: a server-side ``ssl.SSLContext`` makes it an HTTPS server (``base_url`` https://).
    """

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Responder] = {}
        self.fallback: Responder | None = None
        """Answers the paths that have no route (else 404)."""
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and chunked transfer, as real servers
            disable_nagle_algorithm = True  # headers and body are separate small writes

            def do_GET(self) -> None:
                exchange = Exchange(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    connection=self.client_address[1],
                )
                with owner._lock:
                    owner.exchanges.append(exchange)
                    responder = owner.routes.get(urlsplit(self.path).path, owner.fallback)
                reply = responder(exchange) if responder else Reply(404, b"no such route")
                exchange.status = reply.status
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunks is not None:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in reply.chunks:
                        if chunk:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                elif reply.status == 304 or reply.status < 200:
                    self.end_headers()
                else:
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(Handler, tls)

    def route(self, path: str, responder: Responder) -> str:
        """Serve ``path`` with ``responder``; returns the path's absolute URL."""
        with self._lock:
            self.routes[path] = responder
        return self.url(path)

    def requests_to(self, path: str) -> list[Exchange]:
        """The requests received for ``path`` so far, oldest first."""
        with self._lock:
            return [e for e in self.exchanges if urlsplit(e.path).path == path]


@dataclass(frozen=True, slots=True)
class Request:
    """One request to :class:`Documents`."""

    at: float
    """time.monotonic() when the request arrived."""
    replica: str
    """The X-Replica header ("?" when missing)."""
    name: str
    """The document (the URL path without the leading slash)."""


class Documents:
    """Documents at ``/<name>`` with ETags, on an :class:`HttpTestServer`.

    A document whose body is None (or that was never set) answers 404. Every request is
    recorded; ``on_request`` is called (in the server's thread) with each one before it is
    answered, so a test can hold a poll in the middle.
    """

    def __init__(self) -> None:
        self.bodies: dict[str, bytes | None] = {}
        self.on_request: Callable[[Request], None] | None = None
        self._server = HttpTestServer()
        self._server.fallback = self._answer

    def __enter__(self) -> Documents:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.close()

    def url(self, name: str) -> str:
        return self._server.url(f"/{name}")

    def set(self, name: str, body: bytes | None) -> str | None:
        """Serve ``body`` at ``/<name>`` from now on; its version as events carry it."""
        self.bodies[name] = body
        return None if body is None else version_of(body)

    def requests(self, name: str | None = None) -> list[Request]:
        with self._server._lock:
            requests = [_request(e) for e in self._server.exchanges]
        return [r for r in requests if name is None or r.name == name]

    def _answer(self, exchange: Exchange) -> Reply:
        request = _request(exchange)
        if self.on_request is not None:
            self.on_request(request)
        body = self.bodies.get(request.name)
        if body is None:
            return Reply(404)
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if exchange.headers.get("if-none-match") == etag:
            return Reply(304)
        return Reply(200, body, {"ETag": etag, "Content-Type": "application/json"})


def _request(exchange: Exchange) -> Request:
    return Request(
        exchange.at, exchange.headers.get("x-replica", "?"), urlsplit(exchange.path).path[1:]
    )


def version_of(body: bytes) -> str:
    """The version the bridge gives an HTTP body (``data.digest`` of its events)."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


class StaticFileServer(_BackgroundServer):
    """Python's ``SimpleHTTPRequestHandler`` over ``root``: it sends Last-Modified (whole
    seconds) and answers a matching ``If-Modified-Since`` with 304; it sends no ETag."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.exchanges: list[Exchange] = []
        exchanges = self.exchanges

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def send_response(self, code: int, message: str | None = None) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                exchanges.append(Exchange(self.command, self.path, headers, code))
                super().send_response(code, message)

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(Handler)


def nginx_binary() -> str | None:
    """nginx on PATH, or in the sbin directories a non-root PATH may lack."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format koprs escape=none '$status|$request_method|$request_uri|$http_if_none_match|$http_if_modified_since';
    access_log {work}/access.log koprs;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    default_type application/octet-stream;
    types {{ application/json json; text/plain txt; }}
    server {{
        listen {host}:{port};
        root {work}/www;
    }}
}}
"""


class NginxServer:
    """nginx in the foreground (no daemon, no master: it never changes user), its prefix, config,
    logs and document root (``root``) in ``work``. ETags are ``"<mtime hex>-<size hex>"``."""

    def __init__(self, binary: str, work: Path, *, start_timeout_s: float = 10.0) -> None:
        self.work = work
        self.root = work / "www"
        self.root.mkdir(parents=True)
        (work / "tmp").mkdir()
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        conf = work / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(work=work, host=LOOPBACK, port=self.port))
        self._access_log = work / "access.log"
        output = (work / "nginx.out").open("wb")
        self._proc = subprocess.Popen(
            [binary, "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        output.close()
        try:
            self._wait_ready(time.monotonic() + start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self._proc.returncode}: {self._logs()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((LOOPBACK, self.port), timeout=1.0),
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not listen on port {self.port}: {self._logs()}")
            time.sleep(0.02)

    def _logs(self) -> str:
        texts = []
        for name in ("nginx.out", "error.log"):
            with contextlib.suppress(OSError):
                texts.append((self.work / name).read_text(errors="replace"))
        return "\n".join(texts)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def exchanges(self, count: int, timeout_s: float = 10.0) -> list[Exchange]:
        """The requests nginx logged, once there are at least ``count`` of them (nginx writes
        a line after it sent the response, so the last one may still be on its way)."""
        deadline = time.monotonic() + timeout_s
        while len(found := self._logged()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return found

    def _logged(self) -> list[Exchange]:
        found: list[Exchange] = []
        with contextlib.suppress(FileNotFoundError):
            for line in self._access_log.read_text().splitlines():
                status, method, uri, if_none_match, if_modified_since = line.split("|")
                headers = {}
                if if_none_match not in ("", "-"):
                    headers["if-none-match"] = if_none_match
                if if_modified_since not in ("", "-"):
                    headers["if-modified-since"] = if_modified_since
                found.append(Exchange(method, uri, headers, int(status)))
        return found

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
