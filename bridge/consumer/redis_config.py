"""The options of a Redis watch: :class:`RedisWatchConfig`, what
:class:`~bridge.consumer.redis.RedisWatch` reads and how."""

from __future__ import annotations

import dataclasses
from typing import Literal

from bridge.connection_settings import AuthConfig, TlsConfig
from bridge.consumer.dead_letters import redis_dead_letter_prefix
from bridge.errors import ConfigError
from bridge.subjects import REDIS_STREAM_PREFIX, validate_source_name

__all__ = ["RedisWatchConfig"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class RedisWatchConfig:
    """What :class:`~bridge.consumer.redis.RedisWatch` reads and how (see
    :mod:`bridge.consumer.redis`)."""

    sources: tuple[str, ...]
    """Source names: the streams ``<stream_prefix><name>``."""
    group: str | None = None
    """Consumer group: durable position, shared work. None: no group, nothing durable."""
    consumer: str | None = None
    """This process's name in the group; default ``<hostname>-<pid>``."""
    list_first: bool = True
    """List the current items before the live changes (for streams without the group)."""
    stream_prefix: str = REDIS_STREAM_PREFIX
    """As the sink's ``stream_prefix``."""
    on_decode_error: Literal["skip", "raise"] = "skip"
    """``skip``: log, acknowledge and go on; ``raise``: raise the DecodeError from the iteration."""
    batch_size: int = 100
    """Most entries per stream in one read."""
    block_s: float = 5.0
    """Longest wait of one blocking read (the watch checks its timers in between)."""
    claim_idle_s: float = 60.0
    """A pending entry idle for this long is claimed (``XAUTOCLAIM``), this often."""
    retry_max_s: float = 5.0
    """Backoff after Redis errors: from 0.05 s, doubling up to this."""
    list_on_resume: bool = False
    """Also list when the stream has the group already (a cache wants it): the list is the
    state at the stream's last entry; the group's entries up to there are acknowledged
    quietly (the list covers them), later ones are delivered."""
    max_deliveries: int | None = 5
    """Deliveries of one entry before :func:`~bridge.consumer.run_handler` dead-letters it
    (``Delivery.max_attempts``, from the group's delivery count); None: retried for ever."""
    dead_letters: bool = True
    """Give deliveries the means to be dead-lettered (the stream
    ``koprs:deadletter:<source>``, see :mod:`bridge.consumer.dead_letters`)."""
    prune_idle_s: float | None = 3600.0
    """With a group: consumers with nothing pending, idle for this long, are deleted from it
    (``XGROUP DELCONSUMER``; checked every ``claim_idle_s``); None: never."""
    tls: TlsConfig | None = None
    """TLS of a client the watch makes itself (CA, client certificate)."""
    auth: AuthConfig | None = None
    """ACL username/password of a client the watch makes itself."""

    @property
    def dead_letter_prefix(self) -> str:
        """The key prefix of the dead-letter streams (``koprs:deadletter:``)."""
        return redis_dead_letter_prefix(self.stream_prefix)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("redis watch: sources must name at least one source")
        for name in self.sources:
            try:
                validate_source_name(name)
            except ValueError as exc:
                raise ConfigError(f"redis watch: {exc}") from None
        if self.on_decode_error not in ("skip", "raise"):
            raise ConfigError(
                f"redis watch: on_decode_error must be 'skip' or 'raise', "
                f"not {self.on_decode_error!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"redis watch: batch_size must be >= 1, got {self.batch_size!r}")
        if self.max_deliveries is not None and (
            not isinstance(self.max_deliveries, int) or self.max_deliveries < 1
        ):
            raise ConfigError(
                f"redis watch: max_deliveries must be an integer >= 1 or None, "
                f"got {self.max_deliveries!r}"
            )
        if self.prune_idle_s is not None and not (
            isinstance(self.prune_idle_s, int | float) and self.prune_idle_s >= 0
        ):
            raise ConfigError(
                f"redis watch: prune_idle_s must be >= 0 seconds or None, got {self.prune_idle_s!r}"
            )
        for name in ("block_s", "claim_idle_s", "retry_max_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0):
                raise ConfigError(f"redis watch: {name} must be >= 0 seconds, got {value!r}")
