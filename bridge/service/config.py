"""The service configuration: YAML, environment overrides, validation with precise messages.

Top-level keys: ``broker``, ``leader_election``, ``state``, ``sources`` (see README). The
config is a tree of frozen pydantic models (:class:`BridgeConfig` and below) that refuse unknown
keys (they are typos): :mod:`bridge.service.config_document` (the top level and its sections),
:mod:`bridge.service.config_sources` (``sources``), :mod:`bridge.connection_settings` (``tls``
and ``auth``), on the value types of :mod:`bridge.settings`. :func:`config_schema` is their JSON
Schema (``koprs-bridge config-schema``, ``schemas/config/bridge-config.schema.json``).

Every problem of a document is reported at once, in one :class:`~bridge.errors.ConfigError`
with one line per problem naming the file, the key path (``sources[1].http.url``) and the
problem, built from ``ValidationError.errors()`` (:func:`error_lines`).

Environment variables ``KOPRS_BRIDGE__<KEY>__<KEY>...=value`` override the file: the key path is
lowercased (``KOPRS_BRIDGE__BROKER__URL``, ``KOPRS_BRIDGE__SOURCES__0__INTERVAL``) and the value
is read as a YAML scalar; a bad value is reported naming the variable. Secrets (tokens, keys,
URLs with passwords) may be given as ``{env: NAME}`` or ``{file: /path}`` instead of a literal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from bridge.connection_settings import AuthConfig, RedisAuthConfig, TlsConfig
from bridge.errors import ConfigError
from bridge.service.config_document import (
    BridgeConfig,
    BrokerConfig,
    LeaderElectionConfig,
    LoggingConfig,
    ServerConfig,
    StateConfig,
    TracingConfig,
)
from bridge.service.config_sources import (
    BasicAuthConfig,
    HttpSourceConfig,
    LocalSourceConfig,
    S3SourceConfig,
    SourceConfig,
)
from bridge.settings import kind

__all__ = [
    "ENV_PREFIX",
    "SCHEMA_ID",
    "AuthConfig",
    "BasicAuthConfig",
    "BridgeConfig",
    "BrokerConfig",
    "HttpSourceConfig",
    "Key",
    "LeaderElectionConfig",
    "LocalSourceConfig",
    "LoggingConfig",
    "RedisAuthConfig",
    "S3SourceConfig",
    "ServerConfig",
    "SourceConfig",
    "StateConfig",
    "TlsConfig",
    "TracingConfig",
    "apply_env",
    "config_schema",
    "error_lines",
    "key_path",
    "load_config",
    "parse_config",
]

SCHEMA_ID = "https://koprs.dev/schemas/bridge/config/bridge-config.schema.json"
ENV_PREFIX = "KOPRS_BRIDGE__"
Key = tuple[str | int, ...]
"""Where a value is in a document: ``("sources", 1, "http", "url")``."""


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> BridgeConfig:
    """Read, override from the environment and validate a YAML config file."""
    origin = str(path)
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read the config file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{origin}: not a text file in UTF-8 (byte {exc.start}: {exc.reason})"
        ) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{origin}:{where}: not valid YAML: {problem}") from exc
    return parse_config(raw, origin=origin, env=os.environ if env is None else env)


def parse_config(
    raw: Any, *, origin: str = "<config>", env: Mapping[str, str] | None = None
) -> BridgeConfig:
    """Validate an already parsed document (plus environment overrides).

    A :class:`~bridge.errors.ConfigError` lists every problem, one per line.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, not {kind(raw)}")
    overrides = apply_env(raw, env or {}, origin)
    try:
        config = BridgeConfig.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as exc:
        lines = error_lines(exc, origin, overrides)
        raise ConfigError("\n".join(lines)) from None
    return config.located(origin)


def config_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of a config document, for editors and CI."""
    schema = BridgeConfig.model_json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "koprs-bridge config (bridge.yaml)",
    }


# -- environment overrides, messages ------------------------------------------------------------


def apply_env(raw: dict[str, Any], env: Mapping[str, str], origin: str) -> dict[Key, str]:
    """Apply the ``KOPRS_BRIDGE__...`` overrides of ``env`` to ``raw`` (in place).

    Returns the variable behind each key it set or created. Unusable variables (an index that
    is not there, a path through a value that is no mapping, a value that is not YAML) are one
    :class:`~bridge.errors.ConfigError` naming each of them.
    """
    overrides: dict[Key, str] = {}
    problems: list[str] = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX):
            try:
                _apply_one(raw, name, env[name], origin, overrides)
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return overrides


def _apply_one(
    raw: dict[str, Any], name: str, value: str, origin: str, overrides: dict[Key, str]
) -> None:
    keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
    if not all(keys):
        raise ConfigError(f"environment variable {name}: empty key in the path")
    node: Any = raw
    where: Key = ()
    for depth, key in enumerate(keys):
        index: str | int
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(
                    f"environment variable {name}: {key!r} is not an index of "
                    f"{'.'.join(keys[:depth])} (it has {len(node)} entries)"
                )
            index = int(key)
        elif isinstance(node, dict):
            index = key
        else:
            raise ConfigError(
                f"environment variable {name}: {'.'.join(keys[:depth])} "
                f"in {origin} is not a mapping"
            )
        where = (*where, index)
        if depth == len(keys) - 1:
            try:
                node[index] = yaml.safe_load(value) if value else ""
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or exc
                raise ConfigError(
                    f"environment variable {name}: its value is not a valid YAML scalar "
                    f"or document: {problem}"
                ) from exc
            overrides[where] = name
        else:
            if isinstance(node, dict) and index not in node:
                node[index] = {}
                overrides.setdefault(where, name)
            node = node[index]


def key_path(key: Sequence[str | int]) -> str:
    """``sources[1].http.url`` for ``("sources", 1, "http", "url")``."""
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in key).lstrip(".")
    return path or "(top level)"


def error_lines(
    error: ValidationError, origin: str, overrides: Mapping[Key, str] | None = None
) -> list[str]:
    """One line per problem of ``error``: where (file or variable), key path, problem."""
    lines: list[str] = []
    for found in error.errors():
        key: Key = tuple(k for k in found["loc"] if k != "[key]")  # a header name's own error
        line = f"{_where(key, origin, overrides or {})}: {key_path(key)}: {_problem(found)}"
        if line not in lines:
            lines.append(line)
    return lines


def _problem(found: ErrorDetails) -> str:
    """The problem of one error of ``ValidationError.errors()``, in words."""
    if found["type"] == "value_error":
        return str(found["ctx"]["error"])
    if found["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, not {kind(found['input'])}"
    return found["msg"][:1].lower() + found["msg"][1:]


def _where(key: Key, origin: str, overrides: Mapping[Key, str]) -> str:
    """The environment variable that set ``key`` (or a mapping above it), else ``origin``."""
    for depth in range(len(key), 0, -1):
        if key[:depth] in overrides:
            return f"environment variable {overrides[key[:depth]]}"
    return origin
