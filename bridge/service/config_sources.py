"""The ``sources`` of a config document: each one's name, interval and exactly one of ``http``,
``s3`` or ``local`` (pydantic models, see :mod:`bridge.settings`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator, ConfigDict, Field

from bridge.connection_settings import TlsConfig
from bridge.secrets import Secret, redact_url
from bridge.settings import (
    Check,
    ConfigModel,
    Count,
    Duration,
    ExistingFile,
    Flag,
    Problem,
    Size,
    Text,
    TextOrEmpty,
    TextPath,
    WebUrl,
    duration_at_least,
    kind,
    matching,
    one_of,
    text,
    together,
)
from bridge.sources.stores.local import LocalEtag
from bridge.subjects import SOURCE_NAME_PATTERN

__all__ = [
    "MIN_INTERVAL_S",
    "BasicAuthConfig",
    "HttpSourceConfig",
    "LocalSourceConfig",
    "S3SourceConfig",
    "SourceConfig",
]

MIN_INTERVAL_S = 0.001
"""The shortest poll interval accepted."""

KINDS = ("http", "s3", "local")


def _http_url(value: Any) -> str:
    url = text(value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an absolute http:// or https:// URL, not {url!r}")
    if "@" in parts.netloc:
        raise ValueError(
            f"must not carry credentials ({redact_url(url)!r}): it appears in every event "
            "and log line; use basic_auth or bearer_token"
        )
    return url


def _headers(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of header names to values, not {kind(value)}")
    # a number is a fine header value: as text
    return {k: str(v) if isinstance(v, int | float) else v for k, v in value.items()}


def _verify_tls(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError("must be true, false or the path of a CA bundle")
    if not Path(value).is_file():
        raise ValueError(f"CA bundle {value!r} does not exist")
    return value


HeaderName = Annotated[
    str,
    matching(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", lambda _: "is not a valid HTTP header name"),
]
Headers = Annotated[
    Mapping[HeaderName, Secret],
    BeforeValidator(_headers),
]


def _username(value: Any) -> str:
    if ":" in text(value):
        raise ValueError("must not contain ':'")
    return str(value)


class BasicAuthConfig(ConfigModel):
    """``Authorization: Basic`` credentials."""

    username: Annotated[str, Check(_username, {"type": "string", "pattern": r"^[^:]*\S[^:]*$"})]
    password: Secret


class HttpSourceConfig(ConfigModel):
    """An HTTP(S) resource, polled with a conditional GET."""

    url: Annotated[str, Check(_http_url, {"type": "string", "pattern": "^https?://[^@/]+"})]
    headers: Headers = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False}
    )
    """Sent with every request; values may be secrets."""
    bearer_token: Secret | None = None
    """Sent as ``Authorization: Bearer``; a ``{file: ...}`` token is re-read when it changes."""
    basic_auth: BasicAuthConfig | None = None
    max_body_bytes: Size = 16 * 1024 * 1024
    timeout_s: Duration = Field(default=10.0, validation_alias="timeout")
    """The longest one poll's request may take, from connecting to the body's last byte."""
    verify_tls: Annotated[
        bool | str,
        Check(_verify_tls, {"anyOf": [{"type": "boolean"}, {"type": "string", "minLength": 1}]}),
    ] = True
    """False to skip verification, or the path of a CA bundle."""
    tls: TlsConfig | None = None
    """CA bundle / client certificate (mTLS); ``verify_tls`` is the short form."""
    max_redirects: Count = 5
    """Redirects followed (0: none). Credentials are never sent to another host."""

    @classmethod
    def _given_problems(cls, given: set[str]) -> Iterable[Problem]:
        if {"bearer_token", "basic_auth"} <= given:
            yield Problem("give bearer_token or basic_auth, not both")
        if {"verify_tls", "tls"} <= given:
            yield Problem("give verify_tls or tls, not both", "tls")


class S3SourceConfig(ConfigModel):
    """The objects of an S3 (or S3-compatible) bucket, below ``prefix``."""

    bucket: Annotated[
        str,
        matching(
            r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", lambda b: f"{b!r} is not a valid S3 bucket name"
        ),
    ]
    prefix: TextOrEmpty = ""
    endpoint_url: WebUrl | None = None
    region: Text | None = None
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    """Explicit keys; absent: the standard AWS credential chain (env, web identity, profile,
    container/instance metadata)."""
    profile: Text | None = None
    """A profile of the shared AWS config/credentials files."""
    role_arn: Text | None = None
    """Assume this role with ``web_identity_token_file`` (IRSA-style)."""
    web_identity_token_file: ExistingFile | None = None
    sts_endpoint_url: WebUrl | None = None
    """STS endpoint for web identity (default: AWS's)."""

    @classmethod
    def _given_problems(cls, given: set[str]) -> Iterable[Problem]:
        yield from together(given, "role_arn", "web_identity_token_file")
        if {"role_arn", "access_key_id"} <= given:
            yield Problem("give access keys or role_arn/web_identity_token_file, not both")
        yield from together(given, "access_key_id", "secret_access_key")
        if "session_token" in given and "access_key_id" not in given:
            yield Problem("session_token needs access_key_id and secret_access_key")


class LocalSourceConfig(ConfigModel):
    """The files of a local folder (and its subfolders), below ``prefix``."""

    path: TextPath
    prefix: TextOrEmpty = ""
    create: Flag = False
    """Create the folder if it does not exist."""
    etag: Annotated[LocalEtag, one_of("mtime", "content")] = "mtime"
    """What decides that a file changed: ``mtime`` (modification time and size, no read: the
    default) or ``content`` (a digest of the bytes, read again only when mtime or size moved:
    a ``touch`` or a rewrite with the same bytes is no event)."""

    def _problems(self) -> Iterable[Problem]:
        if not self.create and not self.path.is_dir():
            yield Problem(
                f"{str(self.path)!r} is not a directory (set create: true to create it)", "path"
            )


SourceName = Annotated[
    str,
    matching(
        SOURCE_NAME_PATTERN.pattern.strip("^$"),
        lambda name: (
            f"{name!r} is not usable as a subject token: use 1-64 characters of "
            "A-Z, a-z, 0-9, '_' or '-'"
        ),
    ),
]


class SourceConfig(ConfigModel):
    """One source: its name (a subject token), how often it is polled, and what it is."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": [kind]} for kind in KINDS]})

    name: SourceName
    interval_s: Annotated[float, duration_at_least(MIN_INTERVAL_S)] = Field(
        validation_alias="interval"
    )
    """How often the source is polled (at least 1 ms)."""
    max_backoff_s: Duration | None = Field(default=None, validation_alias="max_backoff")
    """The longest wait between polls after failures (>= ``interval``)."""
    inline_body_bytes: Size = 64 * 1024
    """HTTP bodies up to this size are inlined in events; larger ones carry a digest."""
    http: HttpSourceConfig | None = None
    s3: S3SourceConfig | None = None
    local: LocalSourceConfig | None = None

    @property
    def kind(self) -> str:
        return "http" if self.http else "s3" if self.s3 else "local"

    @classmethod
    def _given_problems(cls, given: set[str]) -> Iterable[Problem]:
        found = [key for key in sorted(KINDS) if key in given]
        if len(found) != 1:
            yield Problem(
                "needs exactly one of http, s3, local"
                + (f" (found {', '.join(found)})" if found else "")
            )

    def _problems(self) -> Iterable[Problem]:
        if self.max_backoff_s is not None and self.max_backoff_s < self.interval_s:
            yield Problem(f"must be >= interval ({self.interval_s:g} s)", "max_backoff")
