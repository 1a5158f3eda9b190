"""Secrets in the configuration: given inline, by environment variable, or by file.

A :class:`Secret` never shows its value in ``repr``/``str`` (so not in logs, errors or config
dumps); call :meth:`Secret.reveal` where the value is really needed. A file-backed secret is
re-read when the file changes (Kubernetes rotates projected tokens in place).

``Secret`` is a pydantic type too: a settings field typed ``Secret`` accepts a string, ``{env:
NAME}`` or ``{file: /path}`` (or a ``Secret``), and serializes as its ``repr`` (a model dump
shows where a secret comes from, never its value).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

__all__ = ["Secret", "file_stamp", "no_key_password", "redact_url"]

REDACTED = "***"


class Secret:
    """A secret value and where it comes from (``inline``, ``env:NAME`` or ``file:PATH``).

    Deliberately not a dataclass: ``dataclasses.asdict`` (a config dump) would copy the value
    out; it copies a ``Secret`` as a whole, which then shows as ``Secret(...)``.
    """

    __slots__ = ("_path", "_stamp", "_value", "origin")

    def __init__(
        self,
        origin: str,
        _value: str,
        _path: Path | None = None,
        _stamp: tuple[int, int, int] = (-1, -1, -1),
    ) -> None:
        self.origin = origin
        self._value = _value
        self._path = _path
        self._stamp = _stamp

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

    @classmethod
    def from_config(cls, value: Any) -> Secret:
        """The secret a config value describes; ``ValueError`` says what is wrong with it."""
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be empty")
            return cls.inline(value)
        if isinstance(value, dict) and len(value) == 1:
            ((how, where),) = value.items()
            if how in ("env", "file") and isinstance(where, str) and where:
                try:
                    return cls.from_env(where) if how == "env" else cls.from_file(where)
                except LookupError as exc:
                    raise ValueError(str(exc)) from None
                except OSError as exc:
                    raise ValueError(
                        f"cannot read secret file {where!r}: {exc.strerror or exc}"
                    ) from None
        raise ValueError("must be a string, {env: VARIABLE} or {file: /path/to/file}")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.from_config,
            serialization=core_schema.plain_serializer_function_ser_schema(repr),
            ref="Secret",
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        def one(key: str, what: str) -> dict[str, Any]:
            return {
                "type": "object",
                "properties": {key: {"type": "string", "minLength": 1, "description": what}},
                "required": [key],
                "additionalProperties": False,
            }

        return {
            "anyOf": [
                {"type": "string", "minLength": 1},
                one("env", "the environment variable that holds the value"),
                one("file", "the file that holds the value (re-read when it changes)"),
            ],
            "description": "a secret: the value, {env: VARIABLE} or {file: /path/to/file}",
        }

    def reveal(self) -> str:
        """The value (for a file: its content without trailing newline, re-read on change)."""
        if self._path is not None:
            stamp = file_stamp(self._path)
            if stamp != self._stamp:
                self._value = self._path.read_text("utf-8").rstrip("\r\n")
                self._stamp = stamp
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.origin if self.origin != 'inline' else REDACTED})"

    __str__ = __repr__


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """What tells a rotated file: inode, size and mtime (a symlink swap, as Kubernetes does,
    changes the inode; a rewrite within one coarse timestamp tick most likely the size)."""
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def no_key_password() -> str:
    """``password=`` for ``SSLContext.load_cert_chain``: an encrypted key is an error, not an
    interactive passphrase prompt on the service's terminal."""
    raise ValueError("the client key is encrypted: give it unencrypted (PEM, no passphrase)")


def redact_url(url: str) -> str:
    """``url`` fit for logs and errors: passwords and tokens replaced by ``***``.

    * ``user:password@`` keeps the user: ``user:***@``; a lone userinfo (``redis://secret@host``,
      a NATS token) may be a secret itself and becomes ``***@``;
    * the query and fragment are dropped: they may carry one too (``?password=``, ``?token=``);
    * a comma-separated list of URLs (NATS servers) is redacted URL by URL (a comma inside a
      password stays part of it: only a comma followed by ``scheme://`` separates URLs);
    * what does not parse as a URL, or has an ``@`` outside its authority, shows as ``***``.
    """
    return ",".join(_redact_one(part.strip()) for part in _URL_LIST_SEPARATOR.split(url))


_URL_LIST_SEPARATOR = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in parts.path + parts.query + parts.fragment:
        return REDACTED  # e.g. a password with '/', '?' or '#' not percent-encoded
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hostport}" if has_password else f"{REDACTED}@{hostport}"
    if not netloc and url.startswith(f"{parts.scheme}://"):
        return f"{parts.scheme}://{parts.path}"  # unix:///path: urlunsplit would drop the //
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
