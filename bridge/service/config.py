"""The service configuration: YAML, environment overrides, validation with precise messages.

Top-level keys: ``broker``, ``leader_election``, ``state``, ``sources`` (see README).
Every error is a :class:`~bridge.errors.ConfigError` whose message names the file, the key
path (``sources[1].http.url``) and the problem. Unknown keys are errors (they are typos).

Environment variables ``KOPRS_BRIDGE__<KEY>__<KEY>...=value`` override the file: the key path is
lowercased (``KOPRS_BRIDGE__BROKER__URL``, ``KOPRS_BRIDGE__SOURCES__0__INTERVAL``) and the value
is read as a YAML scalar. Secrets (tokens, keys, URLs with passwords) may be given as
``{env: NAME}`` or ``{file: /path}`` instead of a literal.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, cast
from urllib.parse import urlsplit

import yaml

from bridge.errors import ConfigError
from bridge.secrets import Secret, redact_url
from bridge.subjects import SOURCE_NAME_PATTERN

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
ContentMode = Literal["binary", "structured"]


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
    replicas: int = 1
    """NATS: JetStream replicas of the stream."""
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
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, not {_kind(raw)}")
    raw = _apply_env(raw, env or {}, origin)
    return _Reader(origin).bridge(raw)


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], origin: str) -> dict[str, Any]:
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


def _kind(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "empty",
    }.get(type(value), "a value")


class _Reader:
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
            self.fail(f"must be a mapping, not {_kind(value)}")
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
            self.fail(f"must be a string, not {_kind(value)}")
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

    # -- sections ---------------------------------------------------------------------------

    def bridge(self, raw: dict[str, Any]) -> BridgeConfig:
        doc = self.mapping(
            raw,
            {"broker", "leader_election", "state", "sources", "server", "tracing", "logging"},
            {"broker", "sources"},
        )
        with self.at("broker"):
            broker = self.broker(doc["broker"])
        election = None
        if doc.get("leader_election") is not None:
            with self.at("leader_election"):
                election = self.leader_election(doc["leader_election"])
        state_path = None
        if doc.get("state") is not None:
            with self.at("state"):
                state = self.mapping(doc["state"], {"path"}, {"path"})
                with self.at("path"):
                    state_path = Path(self.string(state["path"]))
        with self.at("sources"):
            items = doc["sources"]
            if not isinstance(items, list) or not items:
                self.fail("must be a non-empty list of sources")
            sources = []
            seen: dict[str, int] = {}
            for index, item in enumerate(items):
                with self.at(index):
                    source = self.source(item)
                    if source.name in seen:
                        self.fail(
                            f"name {source.name!r} is already used by sources[{seen[source.name]}]"
                        )
                    seen[source.name] = index
                    sources.append(source)
        extra: dict[str, Any] = {}
        for key in ("server", "tracing", "logging"):
            if doc.get(key) is not None:
                with self.at(key):
                    extra[key] = getattr(self, key)(doc[key])
        return BridgeConfig(
            broker=broker,
            sources=tuple(sources),
            leader_election=election,
            state_path=state_path,
            origin=self.origin,
            **extra,
        )

    def server(self, raw: Any) -> ServerConfig:
        doc = self.mapping(raw, {"host", "port", "metrics"})
        fields: dict[str, Any] = {}
        if "host" in doc:
            with self.at("host"):
                fields["host"] = self.string(doc["host"])
        if "port" in doc:
            with self.at("port"):
                fields["port"] = self.integer(doc["port"])
                if fields["port"] > 65535:
                    self.fail(f"must be a TCP port (0-65535), not {doc['port']!r}")
        if "metrics" in doc:
            with self.at("metrics"):
                fields["metrics"] = self.boolean(doc["metrics"])
        return ServerConfig(**fields)

    def tracing(self, raw: Any) -> TracingConfig:
        doc = self.mapping(raw, {"exporter", "endpoint", "service_name", "sample_ratio"})
        fields: dict[str, Any] = {}
        if "exporter" in doc:
            with self.at("exporter"):
                if doc["exporter"] not in ("none", "console", "otlp"):
                    self.fail(f"must be 'none', 'console' or 'otlp', not {doc['exporter']!r}")
                fields["exporter"] = doc["exporter"]
        if "endpoint" in doc:
            with self.at("endpoint"):
                endpoint = self.string(doc["endpoint"])
                if urlsplit(endpoint).scheme not in ("http", "https"):
                    self.fail(f"must be an http:// or https:// URL, not {endpoint!r}")
                fields["endpoint"] = endpoint
        if "service_name" in doc:
            with self.at("service_name"):
                fields["service_name"] = self.string(doc["service_name"])
        if "sample_ratio" in doc:
            with self.at("sample_ratio"):
                ratio = doc["sample_ratio"]
                if isinstance(ratio, bool) or not isinstance(ratio, int | float):
                    self.fail(f"must be a number from 0 to 1, not {ratio!r}")
                if not 0 <= ratio <= 1:
                    self.fail(f"must be from 0 to 1, not {ratio!r}")
                fields["sample_ratio"] = float(ratio)
        return TracingConfig(**fields)

    def logging(self, raw: Any) -> LoggingConfig:
        doc = self.mapping(raw, {"format", "level"})
        fields: dict[str, Any] = {}
        if "format" in doc:
            with self.at("format"):
                if doc["format"] not in ("text", "json"):
                    self.fail(f"must be 'text' or 'json', not {doc['format']!r}")
                fields["format"] = doc["format"]
        if "level" in doc:
            with self.at("level"):
                level = str(doc["level"]).upper()
                if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                    self.fail(f"must be debug, info, warning or error, not {doc['level']!r}")
                fields["level"] = level
        return LoggingConfig(**fields)

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

    def broker(self, raw: Any) -> BrokerConfig:
        keys = {
            "url",
            "stream",
            "subject_prefix",
            "content_mode",
            "duplicate_window",
            "max_age",
            "max_msgs_per_subject",
            "replicas",
            "maxlen",
            "ack_timeout",
            "tls",
            "auth",
        }
        doc = self.mapping(raw, keys, {"url"})
        with self.at("url"):
            url = self.secret(doc["url"])
            scheme = urlsplit(url.reveal()).scheme
            kinds = {"nats": "nats", "tls": "nats", "redis": "redis", "rediss": "redis"}
            if scheme not in kinds:
                self.fail(
                    f"must start with nats://, tls://, redis:// or rediss://, "
                    f"got {redact_url(url.reveal())!r}"
                )
        fields: dict[str, Any] = {"url": url, "kind": kinds[scheme]}
        if "stream" in doc:
            with self.at("stream"):
                fields["stream"] = self.string(doc["stream"])
                if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fields["stream"]):
                    self.fail("must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
        if "subject_prefix" in doc:
            with self.at("subject_prefix"):
                prefix = self.string(doc["subject_prefix"])
                if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", prefix):
                    self.fail(
                        f"must be dot-separated tokens of A-Z, a-z, 0-9, '_', '-', not {prefix!r}"
                    )
                fields["subject_prefix"] = prefix
        if "content_mode" in doc:
            with self.at("content_mode"):
                if doc["content_mode"] not in ("binary", "structured"):
                    self.fail(f"must be 'binary' or 'structured', not {doc['content_mode']!r}")
                fields["content_mode"] = doc["content_mode"]
        for key, attr in (
            ("duplicate_window", "duplicate_window_s"),
            ("ack_timeout", "ack_timeout_s"),
        ):
            if key in doc:
                with self.at(key):
                    fields[attr] = self.duration(doc[key])
        if "max_age" in doc:
            with self.at("max_age"):
                fields["max_age_s"] = self.duration(doc["max_age"])
        for key, minimum in (("max_msgs_per_subject", 0), ("replicas", 1), ("maxlen", 1)):
            if key in doc:
                with self.at(key):
                    fields[key] = self.integer(doc[key], minimum=minimum) or None
        if doc.get("tls") is not None:
            with self.at("tls"):
                fields["tls"] = self.tls(doc["tls"])
        if doc.get("auth") is not None:
            with self.at("auth"):
                fields["auth"] = self.auth(doc["auth"], nats=kinds[scheme] == "nats")
        return BrokerConfig(**fields)

    def leader_election(self, raw: Any) -> LeaderElectionConfig:
        doc = self.mapping(
            raw, {"redis_url", "lease_ttl", "renew_every", "tls", "auth"}, {"redis_url"}
        )
        with self.at("redis_url"):
            url = self.secret(doc["redis_url"])
            if urlsplit(url.reveal()).scheme not in ("redis", "rediss"):
                self.fail(
                    f"must start with redis:// or rediss://, got {redact_url(url.reveal())!r}"
                )
        ttl = 10.0
        if "lease_ttl" in doc:
            with self.at("lease_ttl"):
                ttl = self.duration(doc["lease_ttl"])
        renew = None
        if "renew_every" in doc:
            with self.at("renew_every"):
                renew = self.duration(doc["renew_every"])
                if renew >= ttl:
                    self.fail(f"must be shorter than lease_ttl ({ttl:g} s), got {renew:g} s")
        tls = auth = None
        if doc.get("tls") is not None:
            with self.at("tls"):
                tls = self.tls(doc["tls"])
        if doc.get("auth") is not None:
            with self.at("auth"):
                auth = self.auth(doc["auth"], nats=False)
        return LeaderElectionConfig(
            redis_url=url, lease_ttl_s=ttl, renew_every_s=renew, tls=tls, auth=auth
        )

    def source(self, raw: Any) -> SourceConfig:
        kinds = {"http", "s3", "local"}
        doc = self.mapping(
            raw,
            {"name", "interval", "max_backoff", "inline_body_bytes"} | kinds,
            {"name", "interval"},
        )
        with self.at("name"):
            name = self.string(doc["name"])
            if not SOURCE_NAME_PATTERN.match(name):
                self.fail(
                    f"{name!r} is not usable as a subject token: use 1-64 characters of "
                    "A-Z, a-z, 0-9, '_' or '-'"
                )
        with self.at("interval"):
            interval = self.duration(doc["interval"])
        fields: dict[str, Any] = {"name": name, "interval_s": interval}
        if "max_backoff" in doc:
            with self.at("max_backoff"):
                fields["max_backoff_s"] = self.duration(doc["max_backoff"])
                if fields["max_backoff_s"] < interval:
                    self.fail(f"must be >= interval ({interval:g} s)")
        if "inline_body_bytes" in doc:
            with self.at("inline_body_bytes"):
                fields["inline_body_bytes"] = self.size(doc["inline_body_bytes"])
        given = sorted(kinds & doc.keys())
        if len(given) != 1:
            self.fail(
                "needs exactly one of http, s3, local"
                + (f" (found {', '.join(given)})" if given else "")
            )
        kind = given[0]
        with self.at(kind):
            fields[kind] = getattr(self, f"{kind}_source")(doc[kind])
        return SourceConfig(**fields)

    def http_source(self, raw: Any) -> HttpSourceConfig:
        doc = self.mapping(
            raw,
            {
                "url",
                "headers",
                "bearer_token",
                "basic_auth",
                "max_body_bytes",
                "timeout",
                "verify_tls",
                "tls",
                "max_redirects",
            },
            {"url"},
        )
        with self.at("url"):
            url = self.string(doc["url"])
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self.fail(f"must be an absolute http:// or https:// URL, not {url!r}")
            if "@" in parts.netloc:
                self.fail(
                    f"must not carry credentials ({redact_url(url)!r}): it appears in every "
                    "event and log line; use basic_auth or bearer_token"
                )
        fields: dict[str, Any] = {"url": url}
        if "headers" in doc:
            with self.at("headers"):
                headers = doc["headers"]
                if not isinstance(headers, dict):
                    self.fail(f"must be a mapping of header names to values, not {_kind(headers)}")
                parsed = {}
                for header, value in headers.items():
                    with self.at(str(header)):
                        if not isinstance(header, str) or not re.fullmatch(
                            r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", header
                        ):
                            self.fail("is not a valid HTTP header name")
                        parsed[header] = self.secret(
                            str(value) if isinstance(value, int | float) else value
                        )
                fields["headers"] = parsed
        if "bearer_token" in doc:
            with self.at("bearer_token"):
                fields["bearer_token"] = self.secret(doc["bearer_token"])
        if "max_body_bytes" in doc:
            with self.at("max_body_bytes"):
                fields["max_body_bytes"] = self.size(doc["max_body_bytes"])
        if "timeout" in doc:
            with self.at("timeout"):
                fields["timeout_s"] = self.duration(doc["timeout"])
        if "verify_tls" in doc:
            with self.at("verify_tls"):
                verify = doc["verify_tls"]
                if isinstance(verify, str):
                    if not Path(verify).is_file():
                        self.fail(f"CA bundle {verify!r} does not exist")
                elif not isinstance(verify, bool):
                    self.fail("must be true, false or the path of a CA bundle")
                fields["verify_tls"] = verify
        if doc.get("basic_auth") is not None:
            with self.at("basic_auth"):
                basic = self.mapping(
                    doc["basic_auth"], {"username", "password"}, {"username", "password"}
                )
                with self.at("username"):
                    username = self.string(basic["username"])
                    if ":" in username:
                        self.fail("must not contain ':'")
                with self.at("password"):
                    password = self.secret(basic["password"])
                fields["basic_auth"] = BasicAuthConfig(username=username, password=password)
            if "bearer_token" in fields:
                self.fail("give bearer_token or basic_auth, not both")
        if doc.get("tls") is not None:
            with self.at("tls"):
                fields["tls"] = self.tls(doc["tls"])
                if "verify_tls" in fields:
                    self.fail("give verify_tls or tls, not both")
        if "max_redirects" in doc:
            with self.at("max_redirects"):
                fields["max_redirects"] = self.integer(doc["max_redirects"])
        return HttpSourceConfig(**fields)

    def s3_source(self, raw: Any) -> S3SourceConfig:
        secrets = {"access_key_id", "secret_access_key", "session_token"}
        doc = self.mapping(
            raw,
            {
                "bucket",
                "prefix",
                "endpoint_url",
                "region",
                "profile",
                "role_arn",
                "web_identity_token_file",
                "sts_endpoint_url",
            }
            | secrets,
            {"bucket"},
        )
        with self.at("bucket"):
            bucket = self.string(doc["bucket"])
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                self.fail(f"{bucket!r} is not a valid S3 bucket name")
        fields: dict[str, Any] = {"bucket": bucket}
        if "prefix" in doc:
            with self.at("prefix"):
                fields["prefix"] = self.string(doc["prefix"], empty=True)
        if "endpoint_url" in doc:
            with self.at("endpoint_url"):
                endpoint = self.string(doc["endpoint_url"])
                if urlsplit(endpoint).scheme not in ("http", "https"):
                    self.fail(f"must be an http:// or https:// URL, not {endpoint!r}")
                fields["endpoint_url"] = endpoint
        for key in ("region", "profile", "role_arn"):
            if key in doc:
                with self.at(key):
                    fields[key] = self.string(doc[key])
        if "sts_endpoint_url" in doc:
            with self.at("sts_endpoint_url"):
                endpoint = self.string(doc["sts_endpoint_url"])
                if urlsplit(endpoint).scheme not in ("http", "https"):
                    self.fail(f"must be an http:// or https:// URL, not {endpoint!r}")
                fields["sts_endpoint_url"] = endpoint
        if "web_identity_token_file" in doc:
            with self.at("web_identity_token_file"):
                fields["web_identity_token_file"] = self.file(doc["web_identity_token_file"])
        if ("role_arn" in fields) != ("web_identity_token_file" in fields):
            self.fail("role_arn and web_identity_token_file must be given together")
        if "role_arn" in fields and "access_key_id" in doc:
            self.fail("give access keys or role_arn/web_identity_token_file, not both")
        for key in sorted(secrets & doc.keys()):
            with self.at(key):
                fields[key] = self.secret(doc[key])
        if ("access_key_id" in fields) != ("secret_access_key" in fields):
            self.fail("access_key_id and secret_access_key must be given together")
        if "session_token" in fields and "access_key_id" not in fields:
            self.fail("session_token needs access_key_id and secret_access_key")
        return S3SourceConfig(**fields)

    def local_source(self, raw: Any) -> LocalSourceConfig:
        doc = self.mapping(raw, {"path", "prefix", "create"}, {"path"})
        with self.at("path"):
            path = Path(self.string(doc["path"]))
        create = False
        if "create" in doc:
            with self.at("create"):
                create = self.boolean(doc["create"])
        if not create and not path.is_dir():
            with self.at("path"):
                self.fail(f"{str(path)!r} is not a directory (set create: true to create it)")
        prefix = ""
        if "prefix" in doc:
            with self.at("prefix"):
                prefix = self.string(doc["prefix"], empty=True)
        return LocalSourceConfig(path=path, prefix=prefix, create=create)
