"""Logging is set up in one place (bridge.telemetry.logs), never as a side effect of an import."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from bridge.telemetry.logs import TEXT_FORMAT, quiet_asyncio_tls_notice

ROOT = Path(__file__).resolve().parents[2]
NOTICE = "returning true from eof_received() has no effect when using ssl"


def test_importing_the_connections_changes_no_logger() -> None:
    probe = (
        "import logging, bridge.connections, bridge.sinks.nats, bridge.consumer.nats;"
        "print(len(logging.getLogger('asyncio').filters), len(logging.getLogger().handlers))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["0", "0"]


def test_the_logging_set_up_drops_asyncios_tls_notice_once() -> None:
    asyncio_log = logging.getLogger("asyncio")
    quiet_asyncio_tls_notice()
    quiet_asyncio_tls_notice()
    notice = logging.LogRecord("asyncio", logging.WARNING, __file__, 1, NOTICE, None, None)
    other = logging.LogRecord("asyncio", logging.WARNING, __file__, 1, "other", None, None)
    assert not asyncio_log.filter(notice)
    assert asyncio_log.filter(other)
    assert len(asyncio_log.filters) == len(set(asyncio_log.filters))


def test_basic_logging_uses_the_one_text_format() -> None:
    probe = (
        "import logging; from bridge.telemetry.logs import basic_logging; basic_logging('debug');"
        "root = logging.getLogger(); print(root.level, root.handlers[0].formatter._fmt);"
        "print(len(logging.getLogger('asyncio').filters))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines() == [f"{logging.DEBUG} {TEXT_FORMAT}", "1"]
