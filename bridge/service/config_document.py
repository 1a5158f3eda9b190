"""A whole config document: the top level, ``broker``, ``leader_election``, ``state``,
``server``, ``tracing`` and ``logging`` (the ``sources``: :mod:`bridge.service.config_sources`;
TLS and credentials: :mod:`bridge.connection_settings`). Pydantic models, see
:mod:`bridge.settings`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, PrivateAttr, field_validator

from bridge.cloudevents import ContentMode
from bridge.connection_settings import AuthConfig, RedisAuthConfig, TlsConfig
from bridge.redis_urls import REDIS_SCHEMES, check_nats_urls, check_redis_url
from bridge.secrets import Secret, redact_url
from bridge.service.config_sources import SourceConfig
from bridge.settings import (
    Check,
    ConfigModel,
    Duration,
    Flag,
    Problem,
    Text,
    TextPath,
    WebUrl,
    at_least,
    matching,
    one_of,
)

__all__ = [
    "BridgeConfig",
    "BrokerConfig",
    "LeaderElectionConfig",
    "LoggingConfig",
    "ServerConfig",
    "StateConfig",
    "TracingConfig",
]

BROKER_KINDS: dict[str, Literal["nats", "redis"]] = {
    "nats": "nats",
    "tls": "nats",
    **dict.fromkeys(REDIS_SCHEMES, "redis"),
}
"""Broker URL schemes; Redis Cluster and Sentinel URLs: :mod:`bridge.redis_urls`."""


def _broker_url(url: Secret) -> Secret:
    scheme = urlsplit(url.reveal()).scheme.lower()
    if scheme not in BROKER_KINDS:
        raise ValueError(
            "must start with nats://, tls://, redis://, rediss://, redis+cluster://, "
            f"redis+sentinel:// (or rediss+...), got {redact_url(url.reveal())!r}"
        )
    check = check_redis_url if BROKER_KINDS[scheme] == "redis" else check_nats_urls
    if problem := check(url.reveal()):
        raise ValueError(f"{problem} (got {redact_url(url.reveal())!r})")
    return url


def _redis_url(url: Secret) -> Secret:
    if problem := check_redis_url(url.reveal()):
        raise ValueError(f"{problem} (got {redact_url(url.reveal())!r})")
    return url


class BrokerConfig(ConfigModel):
    """Where events are published."""

    url: Annotated[Secret, AfterValidator(_broker_url)]
    """``nats://``/``tls://`` for NATS JetStream, ``redis://``/``rediss://`` for Redis Streams."""
    stream: Annotated[
        str,
        matching(
            r"[A-Za-z0-9_-]{1,64}", lambda _: "must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
        ),
    ] = "KOPRS_EXTERNAL"
    """NATS: the JetStream stream (created or verified at start)."""
    subject_prefix: Annotated[
        str,
        matching(
            r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*",
            lambda p: f"must be dot-separated tokens of A-Z, a-z, 0-9, '_', '-', not {p!r}",
        ),
    ] = "koprs.external"
    """NATS: subjects are ``<prefix>.<source>.<item-token>``."""
    content_mode: Annotated[ContentMode, one_of("binary", "structured")] = "binary"
    """``binary`` (ce-* headers, data as body) or ``structured`` (one JSON document)."""
    duplicate_window_s: Duration | None = Field(default=None, validation_alias="duplicate_window")
    """How long the broker remembers event ids to drop duplicates (default: NATS 2 min,
    Redis 1 day)."""
    max_age_s: Duration | None = Field(default=None, validation_alias="max_age")
    """NATS: drop messages older than this (default: keep)."""
    max_msgs_per_subject: Annotated[
        int | None, at_least(0), AfterValidator(lambda count: count or None)
    ] = 16
    """NATS: messages kept per item subject (0: unlimited)."""
    replicas: Annotated[int, at_least(1)] | None = None
    """NATS: JetStream replicas of the stream (default 1). Redis: copies each write must
    reach before it counts (``WAIT replicas-1``; default 2 on Cluster/Sentinel, else 1)."""
    maxlen: Annotated[int, at_least(1)] = 100_000
    """Redis: approximate MAXLEN of each source's stream."""
    ack_timeout_s: Duration = Field(default=5.0, validation_alias="ack_timeout")
    """How long to wait for the broker's acknowledgements of one batch."""
    tls: TlsConfig | None = None
    """TLS settings (also implied by ``tls://`` / ``rediss://``)."""
    auth: AuthConfig | None = None
    """Credentials (NATS: one of user/password, token, nkey, creds; Redis: user/password)."""

    @property
    def kind(self) -> Literal["nats", "redis"]:
        """``nats`` or ``redis``, from the URL scheme."""
        return BROKER_KINDS[urlsplit(self.url.reveal()).scheme.lower()]

    @property
    def description(self) -> str:
        return redact_url(self.url.reveal())

    def _problems(self) -> Iterable[Problem]:
        if self.auth is not None:
            found = self.auth.nats_problems() if self.kind == "nats" else self.auth.redis_problems()
            for problem in found:
                yield Problem(str(problem), "auth", *problem.at)


class LeaderElectionConfig(ConfigModel):
    """Per-source leases in Redis; absent = a single replica, no election."""

    redis_url: Annotated[Secret, AfterValidator(_redis_url)]
    lease_ttl_s: Duration = Field(default=10.0, validation_alias="lease_ttl")
    """A lease not renewed for this long expires and another replica may take the source."""
    renew_every_s: Duration | None = Field(default=None, validation_alias="renew_every")
    """How often the holder renews (default: a third of the TTL)."""
    wait_replicas: Annotated[int, at_least(0)] | None = None
    """Replicas that must acknowledge each lease acquisition, membership renewal and
    checkpoint write (``WAIT``) before it counts, so that a failover of the Redis primary
    loses none of them (bridge/ha/replication.py). Default: 1 on a ``redis+cluster://`` or
    ``redis+sentinel://`` URL, 0 (no ``WAIT``) on a single server."""
    tls: TlsConfig | None = None
    auth: RedisAuthConfig | None = None
    """Redis ACL ``username``/``password`` (only those two)."""

    @property
    def replicas_to_wait_for(self) -> int:
        """:attr:`wait_replicas`, or its default for the URL's topology."""
        if self.wait_replicas is not None:
            return self.wait_replicas
        from bridge.redis_urls import default_wait_replicas

        return default_wait_replicas(self.redis_url.reveal())

    def _problems(self) -> Iterable[Problem]:
        if self.renew_every_s is not None and self.renew_every_s >= self.lease_ttl_s:
            yield Problem(
                f"must be shorter than lease_ttl ({self.lease_ttl_s:g} s), "
                f"got {self.renew_every_s:g} s",
                "renew_every",
            )


class StateConfig(ConfigModel):
    """Checkpoints of a single replica in a folder."""

    path: TextPath


def _port(port: int) -> int:
    if port > 65535:
        raise ValueError(f"must be a TCP port (0-65535), not {port!r}")
    return port


class ServerConfig(ConfigModel):
    """The operations HTTP server: ``/healthz``, ``/readyz`` and ``/metrics``."""

    host: Text = "0.0.0.0"
    port: Annotated[int, at_least(0), AfterValidator(_port)] = 8080
    """0 picks a free port (tests)."""
    metrics: Flag = True
    """Serve Prometheus metrics at ``/metrics``."""


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number from 0 to 1, not {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"must be from 0 to 1, not {value!r}")
    return float(value)


class TracingConfig(ConfigModel):
    """OpenTelemetry tracing of polls and publishes."""

    exporter: Annotated[Literal["none", "console", "otlp"], one_of("none", "console", "otlp")] = (
        "none"
    )
    endpoint: WebUrl | None = None
    """OTLP/HTTP endpoint (default: the OTEL_EXPORTER_OTLP_* environment, else localhost)."""
    service_name: Text = "koprs-bridge"
    sample_ratio: Annotated[
        float, Check(_ratio, {"type": "number", "minimum": 0, "maximum": 1})
    ] = 1.0


class LoggingConfig(ConfigModel):
    """The log lines' format and level."""

    format: Annotated[Literal["text", "json"], one_of("text", "json")] = "text"
    level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR"],
        one_of("DEBUG", "INFO", "WARNING", "ERROR", any_case=True),
    ] = "INFO"


class BridgeConfig(ConfigModel):
    """A whole config document (``bridge.yaml``)."""

    broker: BrokerConfig
    leader_election: LeaderElectionConfig | None = None
    state: StateConfig | None = None
    """Folder for checkpoints of a single replica (absent: state in memory)."""
    sources: tuple[SourceConfig, ...] = Field(json_schema_extra={"minItems": 1})
    """What is polled: a non-empty list, each name used once."""
    server: ServerConfig | None = None
    """Absent: no health/metrics server."""
    tracing: TracingConfig = TracingConfig()
    logging: LoggingConfig = LoggingConfig()
    max_concurrent_polls: Annotated[int, at_least(1)] = 256
    """Steps (poll, publish, commit) of all sources in flight at once; more wait their turn."""
    _origin: str = PrivateAttr("<config>")

    @property
    def origin(self) -> str:
        """The file the config was read from, for messages."""
        return self._origin

    def located(self, origin: str) -> BridgeConfig:
        """This config, read from ``origin`` (a file name, for messages)."""
        copy = self.model_copy()
        copy._origin = origin
        return copy

    @property
    def state_path(self) -> Path | None:
        """Folder for checkpoints of a single replica (None: state in memory)."""
        return None if self.state is None else self.state.path

    @field_validator("sources", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple) or not value:
            raise ValueError("must be a non-empty list of sources")
        return value

    @field_validator("tracing", "logging", mode="before")
    @classmethod
    def _defaults_if_null(cls, value: Any) -> Any:
        return {} if value is None else value  # null: the defaults

    def _problems(self) -> Iterable[Problem]:
        seen: dict[str, int] = {}
        for index, source in enumerate(self.sources):
            if source.name in seen:
                yield Problem(
                    f"name {source.name!r} is already used by sources[{seen[source.name]}]",
                    "sources",
                    index,
                )
            seen.setdefault(source.name, index)
