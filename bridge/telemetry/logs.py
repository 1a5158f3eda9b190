"""Log output: text (the default) or one JSON object per line (``logging: {format: json}``).

A JSON line has ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, ``exception``
(the traceback, when there is one), ``trace_id``/``span_id`` while a recording span is current
(a poll or a publish, with tracing on), and the ``extra`` fields a call passed. Messages are
what the code logs: secrets never are (URLs are logged with passwords masked).

Logging is set up here only: :func:`basic_logging` before a config is read (the command
line), :func:`configure_logging` from the config's ``logging`` section. Both also install
:func:`quiet_asyncio_tls_notice` (nothing is changed at import time).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    from bridge.service.config import LoggingConfig

__all__ = [
    "TEXT_FORMAT",
    "JsonFormatter",
    "basic_logging",
    "configure_logging",
    "quiet_asyncio_tls_notice",
]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            document["trace_id"] = f"{span_context.trace_id:032x}"
            document["span_id"] = f"{span_context.span_id:016x}"
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in document:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False, default=str)


def _not_the_tls_eof_notice(record: logging.LogRecord) -> bool:
    # nats-py upgrades a plain asyncio stream to TLS, whose protocol then tells asyncio that
    # it keeps the transport open at EOF; asyncio logs a warning for that at every TLS close
    return record.msg != "returning true from eof_received() has no effect when using ssl"


def quiet_asyncio_tls_notice() -> None:
    """Drop asyncio's warning at every close of a NATS TLS connection (harmless: nats-py
    upgrades a plain stream to TLS). Idempotent."""
    asyncio_log = logging.getLogger("asyncio")
    if _not_the_tls_eof_notice not in asyncio_log.filters:
        asyncio_log.addFilter(_not_the_tls_eof_notice)


CHATTY = ("httpx", "httpcore")
"""Client libraries that log a line per request at INFO (every poll of every source): shown
at DEBUG only. The bridge logs what matters of a poll itself (failures, recoveries)."""


def _quiet_clients(level: str) -> None:
    quiet = (
        logging.DEBUG if logging.getLevelName(level.upper()) == logging.DEBUG else logging.WARNING
    )
    for name in CHATTY:
        logging.getLogger(name).setLevel(quiet)


def basic_logging(level: str) -> None:
    """Text lines on stderr at ``level`` (the command line, before a config is read)."""
    logging.basicConfig(level=level.upper(), format=TEXT_FORMAT)
    quiet_asyncio_tls_notice()
    _quiet_clients(level)


def configure_logging(config: LoggingConfig, *, level: str | None = None) -> None:
    """Apply ``config`` to the root logger: the format of every handler (a stderr handler is
    added when there is none) and the level (``level``, from the command line, wins)."""
    quiet_asyncio_tls_notice()
    root = logging.getLogger()
    root.setLevel((level or config.level).upper())
    _quiet_clients(level or config.level)
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    formatter = JsonFormatter() if config.format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
