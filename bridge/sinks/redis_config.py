"""The options of :class:`~bridge.sinks.redis.RedisSink` and the names of its keys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlsplit

from bridge.cloudevents import ContentMode
from bridge.connection_settings import AuthConfig, TlsConfig
from bridge.errors import ConfigError
from bridge.redis_urls import check_redis_url
from bridge.secrets import redact_url
from bridge.subjects import REDIS_STREAM_PREFIX, redis_stream_key

__all__ = ["ContentMode", "RedisSinkConfig", "items_key", "marker_key"]


@dataclass(kw_only=True, frozen=True)
class RedisSinkConfig:
    """Where and how :class:`~bridge.sinks.redis.RedisSink` publishes."""

    url: str = "redis://127.0.0.1:6379/0"
    """``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://`` or ``redis+sentinel://``
    (:mod:`bridge.connections_redis`) URL; may carry a password, which is never logged:
    :attr:`RedisSink.description` shows it as ``***``."""

    stream_prefix: str = REDIS_STREAM_PREFIX
    """Prefix of every key: the stream of source ``S`` is ``<stream_prefix>S``. No braces
    (the other keys use the stream key as Redis Cluster hash tag)."""

    maxlen: int = 100_000
    """Approximate length bound of each stream (``XADD MAXLEN ~``); oldest entries go first."""

    dedup_window_s: float = 86_400.0
    """How long an event id is remembered to drop a republished copy (one small key per
    event). A failed publish must be retried within this window to stay free of duplicates."""

    content_mode: ContentMode = "binary"
    """``binary``: attributes as ``ce-*`` fields plus ``data``; ``structured``: one ``event``
    field with the whole event as JSON."""

    max_event_bytes: int = 64 * 1024 * 1024
    """Largest event published (its fields together); a larger one is left out of its batch
    (see :class:`~bridge.sinks.SizeLimitedSink`). At most the server's ``proto-max-bulk-len``
    (512 MiB by default), over which the server refuses the command and fails the batch."""

    timeout_s: float = 5.0
    """Bound on one publish (all its round trips and one reconnection)."""

    connect_timeout_s: float = 5.0
    """Bound on opening a connection."""

    replicas: int | None = None
    """Copies of every write (the primary and ``replicas - 1`` replicas) before a publish
    counts as acknowledged: ``WAIT replicas-1`` after each transaction. None: 2 for a
    ``redis+cluster://`` or ``redis+sentinel://`` URL (a promoted replica then has every
    acknowledged event), 1 (no ``WAIT``) for a single server."""

    tls: TlsConfig | None = None
    """CA, client certificate (mTLS); given (or a ``rediss://`` URL), TLS is used."""

    auth: AuthConfig | None = None
    """ACL ``username`` and ``password`` (override credentials in the URL)."""

    def __post_init__(self) -> None:
        if self.content_mode not in ("binary", "structured"):
            raise ConfigError(
                f"redis sink: content_mode must be 'binary' or 'structured', not "
                f"{self.content_mode!r}"
            )
        if urlsplit(self.url).scheme != "unix" and (problem := check_redis_url(self.url)):
            raise ConfigError(f"redis sink: url {redact_url(self.url)!r}: {problem}")
        if "{" in self.stream_prefix or "}" in self.stream_prefix:
            raise ConfigError(
                f"redis sink: stream_prefix {self.stream_prefix!r} may not contain '{{' or '}}' "
                "(the stream key is the Redis Cluster hash tag of the sink's other keys)"
            )
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"redis sink: replicas must be >= 1, got {self.replicas!r}")
        if self.maxlen < 1:
            raise ConfigError(f"redis sink: maxlen must be >= 1, got {self.maxlen!r}")
        if self.max_event_bytes < 1:
            raise ConfigError(
                f"redis sink: max_event_bytes must be >= 1, got {self.max_event_bytes!r}"
            )
        for name in ("dedup_window_s", "timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"redis sink: {name} must be > 0 seconds, got {value!r}")

    @property
    def copies(self) -> int:
        """``replicas``, or its default for the URL's topology."""
        if self.replicas is not None:
            return self.replicas
        return 2 if "+" in urlsplit(self.url).scheme else 1


def items_key(source_name: str, prefix: str = REDIS_STREAM_PREFIX) -> str:
    """The hash of a source's current items: ``{koprs:external:<source-name>}:items``."""
    return f"{{{redis_stream_key(source_name, prefix)}}}:items"


def marker_key(source_name: str, event_id: str, prefix: str = REDIS_STREAM_PREFIX) -> str:
    """The dedup marker of an event id: ``{koprs:external:<source-name>}:ids:<event-id>``."""
    return f"{{{redis_stream_key(source_name, prefix)}}}:ids:{event_id}"
