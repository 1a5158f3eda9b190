"""Secrets in the configuration: given inline, by environment variable, or by file.

A :class:`Secret` never shows its value in ``repr``/``str`` (so not in logs, errors or config
dumps); call :meth:`Secret.reveal` where the value is really needed. A file-backed secret is
re-read when the file changes (Kubernetes rotates projected tokens in place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Secret", "redact_url"]

REDACTED = "***"


@dataclass(eq=False)
class Secret:
    """A secret value and where it comes from (``inline``, ``env:NAME`` or ``file:PATH``)."""

    origin: str
    _value: str = field(repr=False)
    _path: Path | None = field(default=None, repr=False)
    _mtime_ns: int = field(default=-1, repr=False)

    @classmethod
    def inline(cls, value: str) -> Secret:
        return cls("inline", value)

    @classmethod
    def from_env(cls, name: str) -> Secret:
        value = os.environ.get(name)
        if value is None:
            raise LookupError(f"environment variable {name} is not set")
        return cls(f"env:{name}", value)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Secret:
        secret = cls(f"file:{path}", "", Path(path))
        secret.reveal()  # fail now, at configuration time, if unreadable
        return secret

    def reveal(self) -> str:
        """The value (for a file: its content without trailing newline, re-read on change)."""
        if self._path is not None:
            mtime_ns = self._path.stat().st_mtime_ns
            if mtime_ns != self._mtime_ns:
                self._value = self._path.read_text("utf-8").rstrip("\r\n")
                self._mtime_ns = mtime_ns
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.origin if self.origin != 'inline' else REDACTED})"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """``url`` with any password (or token-only userinfo) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    shown = f"{user}:{REDACTED}" if has_password else REDACTED
    return urlunsplit(parts._replace(netloc=f"{shown}@{hostport}"))
