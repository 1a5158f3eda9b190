"""The exceptions koprs-bridge raises. All derive from :class:`BridgeError`.

::

    BridgeError
    ├── ConfigError (also ValueError)       a configuration file, key or value is invalid
    │   └── MissingExtraError (also ImportError)  a feature needs an extra that is not installed
    ├── SourceError                         one poll of a source failed; the watch goes on
    │   ├── SourceUnavailableError          transport failure: connect, timeout, DNS, TLS
    │   ├── HttpStatusError                 an HTTP status that is neither a change nor a removal
    │   ├── BodyTooLargeError               a response body over the configured cap
    │   ├── RedirectError                   a redirect the rules refuse (loop, https->http, ...)
    │   └── StoreError                      an object store refused a listing (missing bucket, ...)
    ├── ConnectError                        a broker or Redis connection could not be made
    ├── PublishError                        a broker did not acknowledge a publish
    ├── StateError                          a checkpoint could not be read or written
    │   └── FencedError                     a commit was refused: another replica holds the lease
    └── DecodeError (also ValueError)       a broker message is not a koprs CloudEvent we understand
        └── UnknownEventTypeError           a type or schema version this version does not know

Third-party exceptions are converted where they cross into the project (``raise ... from exc``),
so callers only ever need to catch :class:`BridgeError` and the original is kept as ``__cause__``;
:func:`cause_chain` walks it.
"""

from __future__ import annotations

__all__ = [
    "BodyTooLargeError",
    "BridgeError",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "FencedError",
    "HttpStatusError",
    "MissingExtraError",
    "PublishError",
    "RedirectError",
    "SourceError",
    "SourceUnavailableError",
    "StateError",
    "StoreError",
    "UnknownEventTypeError",
]


class BridgeError(Exception):
    """Root of every exception raised by koprs-bridge."""


class ConfigError(BridgeError, ValueError):
    """A configuration value is invalid. The message names the file, the key and the problem."""


class MissingExtraError(ConfigError, ImportError):
    """A feature needs an optional extra that is not installed (``s3``, ``otel``,
    ``faststream``). The message names the feature and the ``pip install`` that provides it;
    ``extra`` is the extra, ``name`` (as for any ImportError) the missing module."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        message = (
            f"{feature} needs the {extra!r} extra, which is not installed (no module "
            f"{module!r}): pip install 'koprs-bridge[{extra}]'"
        )
        super().__init__(message)
        self.msg = message  # what ImportError's str() and tracebacks show
        self.name = module
        self.feature = feature
        self.extra = extra


class SourceError(BridgeError):
    """One poll of a source failed. The watch logs it, backs off and polls again."""


class SourceUnavailableError(SourceError):
    """The source could not be reached (connection refused, timeout, TLS, DNS)."""


class HttpStatusError(SourceError):
    """The HTTP source answered with a status that is neither a change nor a removal."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"GET {url} answered HTTP {status}")
        self.url = url
        self.status = status


class BodyTooLargeError(SourceError):
    """The HTTP response body is larger than the configured cap: the bytes received or, for a
    compressed body, the bytes it decodes to."""

    def __init__(self, url: str, cap_bytes: int, *, decoded_from: str | None = None) -> None:
        decoding = f" when decoded (Content-Encoding: {decoded_from}; " if decoded_from else " ("
        super().__init__(
            f"GET {url}: response body exceeds the cap of {cap_bytes} bytes{decoding}"
            "raise it with HttpPoller.with_max_body_bytes or `max_body_bytes:`)"
        )
        self.url = url
        self.cap_bytes = cap_bytes
        self.decoded_from = decoded_from
        """The content codings being decoded when the cap was reached (None: none)."""


class StoreError(SourceError):
    """An object store could not list objects (missing bucket, access denied, throttled...)."""


class PublishError(BridgeError):
    """A broker did not acknowledge a publish. Source state was not advanced."""


class StateError(BridgeError):
    """A state checkpoint could not be read or written."""


class FencedError(StateError):
    """A state commit was refused because this replica no longer holds the source's lease."""


class DecodeError(BridgeError, ValueError):
    """A broker message is not a koprs CloudEvent this version understands."""


class ConnectError(BridgeError):
    """A connection could not be made. The message names the server (its password hidden) and
    the cause; the original exception is ``__cause__``."""


class RedirectError(SourceError):
    """A redirect was refused: too many, a loop, another scheme, https to http, disabled."""


class UnknownEventTypeError(DecodeError):
    """A well-formed CloudEvent whose type or schema version this version does not know."""


def cause_chain(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """``exc``, then what caused it (``__cause__``, else ``__context__``), and so on: at most
    ``limit`` exceptions, each once (a cycle ends the walk)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < limit:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain
