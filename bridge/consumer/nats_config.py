"""The options of a NATS watch: :class:`NatsWatchConfig`, what
:class:`~bridge.consumer.nats.NatsWatch` reads and how."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

from bridge.connection_settings import AuthConfig, TlsConfig
from bridge.consumer.dead_letters import nats_dead_letter_prefix, nats_dead_letter_stream
from bridge.errors import ConfigError
from bridge.sinks.nats_config import DEFAULT_STREAM
from bridge.subjects import DEFAULT_SUBJECT_PREFIX, validate_source_name

__all__ = ["ErrorPolicy", "NatsWatchConfig"]

_CONSUMER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
ErrorPolicy = Literal["skip", "raise"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class NatsWatchConfig:
    """What :class:`~bridge.consumer.nats.NatsWatch` reads and how (see
    :mod:`bridge.consumer.nats`)."""

    sources: tuple[str, ...] = ()
    """Source names to watch; empty: every source under ``subject_prefix``."""
    durable: str | None = None
    """Durable consumer name: position kept by the server, work shared. None: ephemeral."""
    list_first: bool = True
    """List the current items before the live changes (a new consumer only). False: start
    after the stream's last message; :class:`Synced` comes at once."""
    stream: str = DEFAULT_STREAM
    """As the sink's ``stream``."""
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    """As the sink's ``subject_prefix``."""
    on_decode_error: ErrorPolicy = "skip"
    """``skip``: log, terminate the message and go on; ``raise``: raise the DecodeError."""
    on_unknown_type: ErrorPolicy = "skip"
    """The same for a well-formed CloudEvent of a type or schema version not known here."""
    batch_size: int = 256
    """Most messages of one pull while messages are pending (one at a time when caught up, so
    a live change is handed over as soon as it arrives)."""
    fetch_timeout_s: float = 5.0
    """Longest wait of one pull; after an empty one the consumer is checked (still there?
    anything pending?)."""
    ack_wait_s: float = 30.0
    """A delivery neither acknowledged nor naked is delivered again after this (new consumers)."""
    max_ack_pending: int = 1000
    """Most deliveries handed out and not yet settled; the server pauses at this (new
    consumers)."""
    confirm_acks: bool = True
    """``ack()`` waits until the server recorded it (one round trip). False: send and go on (an
    acknowledgement lost in a disconnection means one more delivery)."""
    request_timeout_s: float = 5.0
    """Bound on each JetStream API request and each confirmed acknowledgement."""
    inactive_threshold_s: float = 300.0
    """The server deletes an ephemeral consumer nobody pulled from for this long."""
    reconnect_wait_s: float = 0.5
    """Pause between reconnection attempts of a client the watch made itself."""
    retry_max_s: float = 5.0
    """Backoff after errors: from 0.05 s, doubling up to this."""
    list_on_resume: bool = False
    """Also list when resuming an existing durable consumer (a cache wants it): the list is
    read through a short-lived consumer, then the durable goes on after the list's last
    message (what it held up to there is acknowledged quietly: the list covers it)."""
    max_deliveries: int | None = 5
    """Deliveries of one event before :func:`~bridge.consumer.run_handler` dead-letters it
    (``Delivery.max_attempts``); None: retried for ever."""
    dead_letters: bool = True
    """Give deliveries the means to be dead-lettered (see
    :mod:`bridge.consumer.dead_letters`); False: ``Delivery.dead_letter`` refuses."""
    tls: TlsConfig | None = None
    """TLS of a client the watch makes itself (CA, client certificate); see
    :mod:`bridge.connections`."""
    auth: AuthConfig | None = None
    """Credentials of a client the watch makes itself."""

    def __post_init__(self) -> None:
        for name in self.sources:
            try:
                validate_source_name(name)
            except ValueError as exc:
                raise ConfigError(f"nats watch: {exc}") from None
        if self.durable is not None and not _CONSUMER_NAME.match(self.durable):
            raise ConfigError(
                f"nats watch: durable {self.durable!r} must be 1-128 characters of A-Z, a-z, "
                "0-9, '_' or '-'"
            )
        for name in ("on_decode_error", "on_unknown_type"):
            if getattr(self, name) not in ("skip", "raise"):
                raise ConfigError(
                    f"nats watch: {name} must be 'skip' or 'raise', not {getattr(self, name)!r}"
                )
        if self.dead_letter_prefix == self.subject_prefix:
            raise ConfigError(
                f"nats watch: subject_prefix {self.subject_prefix!r} ends in 'deadletter', the "
                "token of the dead-letter subjects: pick another"
            )
        if self.max_deliveries is not None and (
            not isinstance(self.max_deliveries, int) or self.max_deliveries < 1
        ):
            raise ConfigError(
                f"nats watch: max_deliveries must be an integer >= 1 or None, "
                f"got {self.max_deliveries!r}"
            )
        for name in ("batch_size", "max_ack_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"nats watch: {name} must be an integer >= 1, got {value!r}")
        for name in ("fetch_timeout_s", "ack_wait_s", "request_timeout_s", "inactive_threshold_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"nats watch: {name} must be > 0 seconds, got {value!r}")
        for name in ("reconnect_wait_s", "retry_max_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"nats watch: {name} must be >= 0 seconds, got {value!r}")

    @property
    def dead_letter_prefix(self) -> str:
        """The subject prefix of dead letters (``koprs.deadletter``)."""
        return nats_dead_letter_prefix(self.subject_prefix)

    @property
    def dead_letter_stream(self) -> str:
        """The stream of dead letters (``KOPRS_EXTERNAL_DEADLETTER``)."""
        return nats_dead_letter_stream(self.stream)

    @property
    def filter_subjects(self) -> list[str]:
        """The consumer's filter: one subject per source, or the whole prefix."""
        if not self.sources:
            return [f"{self.subject_prefix}.>"]
        return [f"{self.subject_prefix}.{name}.>" for name in sorted(set(self.sources))]
