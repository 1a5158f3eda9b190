"""Reading a config document: the key path of every value, for messages; the checks of single
values (strings, durations like ``30s``, sizes like ``16MiB``, secrets, files) and of the blocks
several sections share (``tls``, ``auth``); environment overrides.

:class:`Reader` is the base of the section readers (:mod:`bridge.service.config_sources`,
:mod:`bridge.service.config_document`); :func:`bridge.service.config.parse_config` uses them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, cast

import yaml

from bridge.errors import ConfigError
from bridge.secrets import Secret
from bridge.service.config import ENV_PREFIX, AuthConfig, TlsConfig

__all__ = ["Reader", "apply_env", "kind"]


def apply_env(raw: dict[str, Any], env: Mapping[str, str], origin: str) -> dict[str, Any]:
    """``raw`` with the ``KOPRS_BRIDGE__...`` overrides of ``env`` applied (in place)."""
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"environment variable {name}: empty key in the path")
        node: Any = raw
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(
                        f"environment variable {name}: {key!r} is not an index of "
                        f"{'.'.join(keys[:depth])} (it has {len(node)} entries)"
                    )
                index: Any = int(key)
            elif isinstance(node, dict):
                index = key
            else:
                raise ConfigError(
                    f"environment variable {name}: {'.'.join(keys[:depth])} "
                    f"in {origin} is not a mapping"
                )
            if last:
                try:
                    node[index] = yaml.safe_load(env[name]) if env[name] else ""
                except yaml.YAMLError as exc:
                    problem = getattr(exc, "problem", None) or exc
                    raise ConfigError(
                        f"environment variable {name}: its value is not a valid YAML scalar "
                        f"or document: {problem}"
                    ) from exc
            else:
                if isinstance(node, dict) and index not in node:
                    node[index] = {}
                node = node[index]
    return raw


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def kind(value: Any) -> str:
    """What ``value`` is, for messages: "a mapping", "a list", "a string"..."""
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "empty",
    }.get(type(value), "a value")


class Reader:
    """Walks the raw document, keeping the key path for error messages."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.path: list[str] = []

    def fail(self, problem: str) -> NoReturn:
        where = "".join(self.path).lstrip(".") or "(top level)"
        raise ConfigError(f"{self.origin}: {where}: {problem}")

    @contextmanager
    def at(self, key: str | int) -> Iterator[None]:
        self.path.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        try:
            yield
        finally:
            self.path.pop()

    def mapping(
        self, value: Any, allowed: set[str], required: Collection[str] = ()
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(f"must be a mapping, not {kind(value)}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            self.fail(
                f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
            )
        missing = sorted(set(required) - value.keys())
        if missing:
            self.fail(f"missing required key(s) {', '.join(missing)}")
        return cast(dict[str, Any], value)

    def string(self, value: Any, *, empty: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(f"must be a string, not {kind(value)}")
        if not empty and not value.strip():
            self.fail("must not be empty")
        return value

    def boolean(self, value: Any) -> bool:
        if not isinstance(value, bool):
            self.fail(f"must be true or false, not {value!r}")
        return value

    def duration(self, value: Any, *, positive: bool = True) -> float:
        seconds: float
        if isinstance(value, bool):
            self.fail(f"must be a duration (seconds, or like 500ms, 30s, 5m, 1h), not {value!r}")
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match[1]) * _DURATION_UNITS[match[2]]
        else:
            self.fail(f"must be a duration (seconds, or like 500ms, 30s, 5m, 1h), not {value!r}")
        if not seconds >= 0 or (positive and seconds == 0):  # NaN fails the first test
            self.fail(f"must be {'> 0' if positive else '>= 0'}, got {value!r}")
        if math.isinf(seconds):
            self.fail(f"must be finite, got {value!r}")
        return seconds

    def size(self, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            count = value
        elif isinstance(value, str) and (match := _SIZE.match(value)):
            count = int(match[1]) * _SIZE_UNITS[match[2]]
        else:
            self.fail(f"must be a size in bytes (like 65536, 64KiB, 16MiB), not {value!r}")
        if count <= 0:
            self.fail(f"must be > 0, got {value!r}")
        return count

    def integer(self, value: Any, *, minimum: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(f"must be an integer >= {minimum}, not {value!r}")
        return value

    def secret(self, value: Any) -> Secret:
        if isinstance(value, str):
            if not value:
                self.fail("must not be empty")
            return Secret.inline(value)
        if isinstance(value, dict) and len(value) == 1:
            ((how, where),) = value.items()
            if how in ("env", "file") and isinstance(where, str) and where:
                try:
                    return Secret.from_env(where) if how == "env" else Secret.from_file(where)
                except LookupError as exc:
                    self.fail(str(exc))
                except OSError as exc:
                    self.fail(f"cannot read secret file {where!r}: {exc.strerror or exc}")
        self.fail("must be a string, {env: VARIABLE} or {file: /path/to/file}")

    def file(self, value: Any) -> Path:
        path = Path(self.string(value))
        if not path.is_file():
            self.fail(f"file {str(path)!r} does not exist")
        return path

    def tls(self, raw: Any) -> TlsConfig:
        doc = self.mapping(raw, {"ca_file", "cert_file", "key_file", "verify", "server_name"})
        fields: dict[str, Any] = {}
        for key in ("ca_file", "cert_file", "key_file"):
            if key in doc:
                with self.at(key):
                    fields[key] = self.file(doc[key])
        if ("cert_file" in fields) != ("key_file" in fields):
            self.fail("cert_file and key_file must be given together")
        if "verify" in doc:
            with self.at("verify"):
                fields["verify"] = self.boolean(doc["verify"])
        if "server_name" in doc:
            with self.at("server_name"):
                fields["server_name"] = self.string(doc["server_name"])
        return TlsConfig(**fields)

    def auth(self, raw: Any, *, nats: bool) -> AuthConfig:
        allowed = {"username", "password"}
        if nats:
            allowed |= {"token", "nkey_seed_file", "creds_file"}
        doc = self.mapping(raw, allowed)
        fields: dict[str, Any] = {}
        if "username" in doc:
            with self.at("username"):
                fields["username"] = self.string(doc["username"])
        for key in ("password", "token"):
            if key in doc:
                with self.at(key):
                    fields[key] = self.secret(doc[key])
        for key in ("nkey_seed_file", "creds_file"):
            if key in doc:
                with self.at(key):
                    fields[key] = self.file(doc[key])
        if nats and "username" in fields and "password" not in fields:
            self.fail("username needs a password")
        methods = [
            m
            for m, given in (
                ("username/password", "password" in fields),
                ("token", "token" in fields),
                ("nkey_seed_file", "nkey_seed_file" in fields),
                ("creds_file", "creds_file" in fields),
            )
            if given
        ]
        if len(methods) > 1:
            self.fail(f"give one authentication method, not {' and '.join(methods)}")
        return AuthConfig(**fields)
