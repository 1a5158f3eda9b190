"""The service configuration: YAML, environment overrides, validation with precise messages.

Top-level keys: ``broker``, ``leader_election``, ``state``, ``sources`` (see README).
Every error is a :class:`~bridge.errors.ConfigError` whose message names the file, the key
path (``sources[1].http.url``) and the problem. Unknown keys are errors (they are typos).

Environment variables ``KOPRS_BRIDGE__<KEY>__<KEY>...=value`` override the file: the key path is
lowercased (``KOPRS_BRIDGE__BROKER__URL``, ``KOPRS_BRIDGE__SOURCES__0__INTERVAL``) and the value
is read as a YAML scalar. Secrets (tokens, keys, URLs with passwords) may be given as
``{env: NAME}`` or ``{file: /path}`` instead of a literal.

The readers behind :func:`parse_config`: :mod:`bridge.service.config_reader` (values, shared
blocks, environment overrides), :mod:`bridge.service.config_sources` and
:mod:`bridge.service.config_document`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bridge.cloudevents import ContentMode
from bridge.errors import ConfigError
from bridge.secrets import Secret, redact_url

__all__ = [
    "AuthConfig",
    "BasicAuthConfig",
    "BridgeConfig",
    "BrokerConfig",
    "HttpSourceConfig",
    "LeaderElectionConfig",
    "LocalSourceConfig",
    "LoggingConfig",
    "S3SourceConfig",
    "ServerConfig",
    "SourceConfig",
    "TlsConfig",
    "TracingConfig",
    "load_config",
    "parse_config",
]

ENV_PREFIX = "KOPRS_BRIDGE__"


@dataclass(kw_only=True, frozen=True)
class TlsConfig:
    """TLS for a connection: a custom CA, an optional client certificate (mTLS)."""

    ca_file: Path | None = None
    """CA bundle (PEM) that signs the server's certificate (default: the system's)."""
    cert_file: Path | None = None
    """Client certificate (PEM) for mutual TLS; needs ``key_file``."""
    key_file: Path | None = None
    verify: bool = True
    """False skips verifying the server's certificate (testing only)."""
    server_name: str | None = None
    """Expected host name in the server's certificate (default: the URL's host)."""


@dataclass(kw_only=True, frozen=True)
class AuthConfig:
    """Credentials for a broker or Redis; at most one method (user/password, token, nkey, creds).

    ``token``, ``nkey_seed_file`` and ``creds_file`` are NATS-only; Redis takes an ACL
    ``username`` (optional) and ``password``. Credentials in the URL work too.
    """

    username: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    """NATS JWT credentials (``.creds``) file."""


@dataclass(kw_only=True, frozen=True)
class BasicAuthConfig:
    username: str
    password: Secret


@dataclass(kw_only=True, frozen=True)
class BrokerConfig:
    """Where events are published."""

    url: Secret
    """``nats://``/``tls://`` for NATS JetStream, ``redis://``/``rediss://`` for Redis Streams."""
    kind: Literal["nats", "redis"]
    """Derived from the URL scheme."""
    stream: str = "KOPRS_EXTERNAL"
    """NATS: the JetStream stream (created or verified at start)."""
    subject_prefix: str = "koprs.external"
    """NATS: subjects are ``<prefix>.<source>.<item-token>``."""
    content_mode: ContentMode = "binary"
    """``binary`` (ce-* headers, data as body) or ``structured`` (one JSON document)."""
    duplicate_window_s: float | None = None
    """How long the broker remembers event ids to drop duplicates (default: NATS 2 min,
    Redis 1 day)."""
    max_age_s: float | None = None
    """NATS: drop messages older than this (default: keep)."""
    max_msgs_per_subject: int | None = 16
    """NATS: messages kept per item subject (0: unlimited)."""
    replicas: int | None = None
    """NATS: JetStream replicas of the stream (default 1). Redis: copies each write must
    reach before it counts (``WAIT replicas-1``; default 2 on Cluster/Sentinel, else 1)."""
    maxlen: int = 100_000
    """Redis: approximate MAXLEN of each source's stream."""
    ack_timeout_s: float = 5.0
    """How long to wait for the broker's acknowledgements of one batch."""
    tls: TlsConfig | None = None
    """TLS settings (also implied by ``tls://`` / ``rediss://``)."""
    auth: AuthConfig | None = None

    @property
    def description(self) -> str:
        return redact_url(self.url.reveal())


@dataclass(kw_only=True, frozen=True)
class LeaderElectionConfig:
    """Per-source leases in Redis; absent = a single replica, no election."""

    redis_url: Secret
    lease_ttl_s: float = 10.0
    """A lease not renewed for this long expires and another replica may take the source."""
    renew_every_s: float | None = None
    """How often the holder renews (default: a third of the TTL)."""
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    """Redis ACL ``username``/``password`` (only those two)."""


@dataclass(kw_only=True, frozen=True)
class HttpSourceConfig:
    url: str
    headers: Mapping[str, Secret] = field(default_factory=dict)
    bearer_token: Secret | None = None
    """Sent as ``Authorization: Bearer``; a ``{file: ...}`` token is re-read when it changes."""
    basic_auth: BasicAuthConfig | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    timeout_s: float = 10.0
    """The longest one poll's request may take, from connecting to the body's last byte."""
    verify_tls: bool | str = True
    """False to skip verification, or the path of a CA bundle."""
    tls: TlsConfig | None = None
    """CA bundle / client certificate (mTLS); ``verify_tls`` is the short form."""
    max_redirects: int = 5
    """Redirects followed (0: none). Credentials are never sent to another host."""


@dataclass(kw_only=True, frozen=True)
class S3SourceConfig:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    """Explicit keys; absent: the standard AWS credential chain (env, web identity, profile,
    container/instance metadata)."""
    profile: str | None = None
    """A profile of the shared AWS config/credentials files."""
    role_arn: str | None = None
    """Assume this role with ``web_identity_token_file`` (IRSA-style)."""
    web_identity_token_file: Path | None = None
    sts_endpoint_url: str | None = None
    """STS endpoint for web identity (default: AWS's)."""


@dataclass(kw_only=True, frozen=True)
class LocalSourceConfig:
    path: Path
    prefix: str = ""
    create: bool = False
    """Create the folder if it does not exist."""


@dataclass(kw_only=True, frozen=True)
class SourceConfig:
    name: str
    interval_s: float
    max_backoff_s: float | None = None
    inline_body_bytes: int = 64 * 1024
    """HTTP bodies up to this size are inlined in events; larger ones carry a digest."""
    http: HttpSourceConfig | None = None
    s3: S3SourceConfig | None = None
    local: LocalSourceConfig | None = None

    @property
    def kind(self) -> str:
        return "http" if self.http else "s3" if self.s3 else "local"


@dataclass(kw_only=True, frozen=True)
class ServerConfig:
    """The operations HTTP server: ``/healthz``, ``/readyz`` and ``/metrics``."""

    host: str = "0.0.0.0"
    port: int = 8080
    """0 picks a free port (tests)."""
    metrics: bool = True
    """Serve Prometheus metrics at ``/metrics``."""


@dataclass(kw_only=True, frozen=True)
class TracingConfig:
    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str | None = None
    """OTLP/HTTP endpoint (default: the OTEL_EXPORTER_OTLP_* environment, else localhost)."""
    service_name: str = "koprs-bridge"
    sample_ratio: float = 1.0


@dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(kw_only=True, frozen=True)
class BridgeConfig:
    broker: BrokerConfig
    sources: tuple[SourceConfig, ...]
    leader_election: LeaderElectionConfig | None = None
    state_path: Path | None = None
    """Folder for checkpoints of a single replica (absent: state in memory)."""
    server: ServerConfig | None = None
    """Absent: no health/metrics server."""
    tracing: TracingConfig = TracingConfig()
    logging: LoggingConfig = LoggingConfig()
    origin: str = "<config>"
    """The file the config was read from, for messages."""


# -- loading ----------------------------------------------------------------------------------


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
    """Validate an already parsed document (plus environment overrides)."""
    # the readers build the classes above: imported here, not at the top (no import cycle)
    from bridge.service.config_document import DocumentReader
    from bridge.service.config_reader import apply_env, kind

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, not {kind(raw)}")
    raw = apply_env(raw, env or {}, origin)
    return DocumentReader(origin).bridge(raw)
