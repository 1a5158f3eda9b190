"""The options of :class:`~bridge.sinks.nats.NatsSink` and the JetStream stream they define.

Retention: by default nothing expires by age or size and each item keeps its last
``max_msgs_per_subject`` messages, so the stream always holds the current state of every item
(the last message of a removed item is its ``Removed`` event). ``max_age_s`` and ``max_bytes``
bound the stream further, at the price of forgetting items that did not change for long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from bridge.cloudevents import ContentMode
from bridge.connection_settings import AuthConfig, TlsConfig
from bridge.errors import ConfigError
from bridge.subjects import DEFAULT_SUBJECT_PREFIX

__all__ = [
    "DEFAULT_STREAM",
    "ContentMode",
    "NatsSinkConfig",
    "stream_changes",
    "subject_filter_covers",
]

DEFAULT_STREAM = "KOPRS_EXTERNAL"
_FORBIDDEN_IN_TOKEN = frozenset(".*> \t\r\n")


@dataclass(kw_only=True, frozen=True)
class NatsSinkConfig:
    """Where and how :class:`~bridge.sinks.nats.NatsSink` publishes."""

    url: str = "nats://127.0.0.1:4222"
    """Server URL; several are separated by commas. May carry credentials (``user:pass@`` or a
    token): they are never logged, :attr:`NatsSink.description` replaces them with ``***``."""

    stream: str = DEFAULT_STREAM
    """JetStream stream name; created when missing."""

    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    """Events go to ``<subject_prefix>.<source-name>.<item-token>``; the stream covers
    ``<subject_prefix>.>``."""

    content_mode: ContentMode = "binary"
    """``binary`` (``ce-*`` headers, data as body) or ``structured`` (one JSON document)."""

    duplicate_window_s: float = 120.0
    """How long JetStream remembers a ``Nats-Msg-Id`` to drop a republished copy. A crashed
    publish must be retried within this window to stay free of duplicates."""

    max_age_s: float | None = None
    """Drop messages older than this; ``None`` (default) keeps them, so the latest message of
    every item stays available. Must not be below ``duplicate_window_s``."""

    max_bytes: int | None = None
    """Size limit of the whole stream (oldest messages go first); ``None``: unlimited."""

    max_msgs_per_subject: int | None = 16
    """Messages kept per item (subject); older ones are dropped. ``None``: unlimited. The
    default keeps a short history per item while bounding the stream by the number of items."""

    replicas: int = 1
    """Stream replicas (1 on a single server; 3 on a cluster for fault tolerance)."""

    ack_timeout_s: float = 5.0
    """How long to wait for the acknowledgements of a batch after its last message was sent,
    and for a lost connection to come back before a publish fails."""

    connect_timeout_s: float = 5.0
    """Bound on the first connection (and on each stream-management request)."""

    reconnect_wait_s: float = 1.0
    """Pause between reconnection attempts after the connection was lost. The client never
    gives up reconnecting; publishes fail meanwhile."""

    tls: TlsConfig | None = None
    """CA, client certificate (mTLS); given (or a ``tls://`` URL), TLS is required."""

    auth: AuthConfig | None = None
    """User/password, token, nkey seed file or ``.creds`` file (see :mod:`bridge.connections`)."""

    def __post_init__(self) -> None:
        if self.content_mode not in ("binary", "structured"):
            raise ConfigError(
                f"nats sink: content_mode must be 'binary' or 'structured', not "
                f"{self.content_mode!r}"
            )
        if not self.stream or any(c in _FORBIDDEN_IN_TOKEN for c in self.stream):
            raise ConfigError(
                f"nats sink: stream {self.stream!r} must be non-empty, without '.', '*', '>' "
                "or whitespace"
            )
        tokens = self.subject_prefix.split(".")
        if not all(tokens) or any(c in _FORBIDDEN_IN_TOKEN - {"."} for c in self.subject_prefix):
            raise ConfigError(
                f"nats sink: subject_prefix {self.subject_prefix!r} must be dot-separated "
                "non-empty tokens without '*', '>' or whitespace"
            )
        for name in ("duplicate_window_s", "ack_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"nats sink: {name} must be > 0 seconds, got {value!r}")
        if not self.reconnect_wait_s >= 0:
            raise ConfigError(
                f"nats sink: reconnect_wait_s must be >= 0, not {self.reconnect_wait_s!r}"
            )
        if self.max_age_s is not None and self.max_age_s < self.duplicate_window_s:
            raise ConfigError(
                f"nats sink: max_age_s ({self.max_age_s}) must be >= duplicate_window_s "
                f"({self.duplicate_window_s}) or None"
            )
        for name in ("max_bytes", "max_msgs_per_subject"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"nats sink: {name} must be >= 1 or None, got {value!r}")
        if self.replicas < 1:
            raise ConfigError(f"nats sink: replicas must be >= 1, got {self.replicas!r}")

    @property
    def servers(self) -> list[str]:
        return [part.strip() for part in self.url.split(",") if part.strip()]

    def stream_config(self) -> StreamConfig:
        """The stream the sink creates (see :mod:`bridge.sinks.nats`)."""
        return StreamConfig(
            name=self.stream,
            description="koprs-bridge CloudEvents (one subject per item)",
            subjects=[f"{self.subject_prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_s,
            max_age=self.max_age_s or 0.0,
            max_bytes=self.max_bytes or -1,
            max_msgs_per_subject=self.max_msgs_per_subject or -1,
        )


def subject_filter_covers(pattern: str, prefix: str) -> bool:
    """Whether every subject under ``<prefix>.>`` matches the stream subject ``pattern``."""
    wanted = prefix.split(".")
    for i, token in enumerate(pattern.split(".")):
        if token == ">":
            return i <= len(wanted)
        if i >= len(wanted) or (token != "*" and token != wanted[i]):
            return False
    return False


def stream_changes(current: StreamConfig, cfg: NatsSinkConfig) -> dict[str, object]:
    """What to update on an existing stream so that it matches ``cfg``."""
    changes: dict[str, object] = {}
    subjects = list(current.subjects or [])
    if not any(subject_filter_covers(s, cfg.subject_prefix) for s in subjects):
        changes["subjects"] = [*subjects, f"{cfg.subject_prefix}.>"]
    if not math.isclose(current.duplicate_window or 0.0, cfg.duplicate_window_s):
        changes["duplicate_window"] = cfg.duplicate_window_s
    wanted = cfg.stream_config()
    if not math.isclose(current.max_age or 0.0, wanted.max_age or 0.0):
        changes["max_age"] = wanted.max_age
    for name in ("max_bytes", "max_msgs_per_subject"):
        have = getattr(current, name)
        if (have if have is not None and have > 0 else -1) != getattr(wanted, name):
            changes[name] = getattr(wanted, name)
    if (current.num_replicas or 1) != cfg.replicas:
        changes["num_replicas"] = cfg.replicas
    return changes
