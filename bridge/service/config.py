"""The service configuration: YAML, environment overrides, validation with precise messages.

Top-level keys: ``broker``, ``leader_election``, ``state``, ``sources`` (see README). The
config is a tree of frozen pydantic models (:class:`BridgeConfig` and below) that refuse unknown
keys (they are typos): :mod:`bridge.service.config_document` (the top level and its sections),
:mod:`bridge.service.config_sources` (``sources``), :mod:`bridge.connection_settings` (``tls``
and ``auth``), on the value types of :mod:`bridge.settings`. :func:`config_schema` is their JSON
Schema (``koprs-bridge config-schema``, ``schemas/config/bridge-config.schema.json``).

Every problem of a document is reported at once, in one :class:`~bridge.errors.ConfigError`
with one line per problem naming the file, the key path (``sources[1].http.url``) and the
problem (:mod:`bridge.service.config_reader`).

Environment variables ``KOPRS_BRIDGE__<KEY>__<KEY>...=value`` override the file: the key path is
lowercased (``KOPRS_BRIDGE__BROKER__URL``, ``KOPRS_BRIDGE__SOURCES__0__INTERVAL``) and the value
is read as a YAML scalar; a bad value is reported naming the variable. Secrets (tokens, keys,
URLs with passwords) may be given as ``{env: NAME}`` or ``{file: /path}`` instead of a literal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

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
from bridge.service.config_reader import ENV_PREFIX, apply_env, error_lines
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
    "config_schema",
    "load_config",
    "parse_config",
]

SCHEMA_ID = "https://koprs.dev/schemas/bridge/config/bridge-config.schema.json"


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
        lines = error_lines(exc, BridgeConfig, origin, overrides)
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
