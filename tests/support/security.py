"""What the security tests share: recorded logs, a bridge run in the background, configs.

* :class:`LogRecorder`: a logging handler keeping every record (formatted, with tracebacks),
  with :meth:`LogRecorder.wait_for` to await a condition on them (no sleeps).
* :func:`running_bridge`: a :class:`~bridge.service.runner.Bridge` running in a task, stopped
  on exit; it records what it published.
* :func:`redis_tls_args`: the ``redis-server`` options of a TLS-only server.
* :func:`nats_tls_block`: the ``tls {...}`` block of a nats-server configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from bridge.cloudevents import CloudEvent
from bridge.service.config import BridgeConfig, parse_config
from bridge.service.runner import Bridge
from tests.support.credentials import Pki
from tests.support.servers import RedisServer, ServerError

__all__ = [
    "LogRecorder",
    "Published",
    "nats_tls_block",
    "recording_logs",
    "redis_tls_args",
    "running_bridge",
    "tls_redis",
]


IN_MEMORY_NOTICE = "source state is kept in memory only"


class LogRecorder(logging.Handler):
    """Keeps every record it sees; :meth:`wait_for` awaits a condition on them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._changed: asyncio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))  # with the traceback, if any
        if self._changed is not None:
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[list[logging.LogRecord]], bool], timeout_s: float = 60.0
    ) -> None:
        self._changed = asyncio.Event()
        async with asyncio.timeout(timeout_s):
            while not predicate(self.records):
                self._changed.clear()
                await self._changed.wait()

    def warnings(self, logger_prefix: str = "") -> list[logging.LogRecord]:
        """Warnings and errors, but the start-up notice of a bridge without a state store
        (these tests run without one on purpose)."""
        return [
            r
            for r in self.records
            if r.levelno >= logging.WARNING
            and r.name.startswith(logger_prefix)
            and not r.getMessage().startswith(IN_MEMORY_NOTICE)
        ]

    def messages(self, min_level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= min_level]

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def recording_logs(level: int = logging.DEBUG) -> Any:
    """Record every log record of every logger at ``level`` and above while inside."""
    recorder = LogRecorder()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(recorder)
    root.setLevel(level)
    try:
        yield recorder
    finally:
        root.removeHandler(recorder)
        root.setLevel(old_level)


@dataclass
class Published:
    """What a bridge published, as its on_published callback saw it."""

    events: list[tuple[str, CloudEvent]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, source_name: str, events: Sequence[CloudEvent]) -> None:
        self.events.extend((source_name, event) for event in events)
        self.changed.set()

    async def wait_for(self, count: int, timeout_s: float = 60.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.events) < count:
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def running_bridge(
    config: BridgeConfig | dict[str, Any], **options: Any
) -> AsyncIterator[tuple[Bridge, Published]]:
    """Run a bridge (a config, or a raw document to parse) until the block ends."""
    if isinstance(config, dict):
        config = parse_config(config, env={})
    published = Published()
    bridge = Bridge(config, on_published=published.record, shutdown_grace_s=1, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield bridge, published
    finally:
        stop.set()
        await task


@contextlib.contextmanager
def tls_redis(extra_args: Sequence[str]) -> Iterator[RedisServer]:
    """A TLS-only redis-server; the test is skipped, saying why, if this build has no TLS."""
    server = RedisServer(tls=True, extra_args=extra_args)
    try:
        try:
            server.start()
        except ServerError as exc:
            # a build without TLS does not know the tls-* directives:
            #   >>> 'tls-port "6380"'
            #   Bad directive or wrong number of arguments
            text = str(exc)
            refused = [line for line in text.splitlines() if line.startswith(">>> 'tls-")]
            if refused and "Bad directive" in text:
                pytest.skip(f"this redis-server was built without TLS support: {refused[0]}")
            raise
        yield server
    finally:
        server.close()


def redis_tls_args(pki: Pki, *, auth_clients: str = "no") -> list[str]:
    """``redis-server`` options for TLS with the test PKI; ``auth_clients``: yes/no/optional."""
    return [
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca_file),
        "--tls-auth-clients", auth_clients,
    ]  # fmt: skip


def nats_tls_block(pki: Pki, *, verify: bool = False) -> str:
    """The ``tls`` block of a nats-server config; ``verify``: require client certificates."""
    return (
        "tls {\n"
        f'  cert_file: "{pki.server_cert}"\n'
        f'  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca_file}"\n'
        f"  verify: {'true' if verify else 'false'}\n"
        "  timeout: 5\n"
        "}\n"
    )
