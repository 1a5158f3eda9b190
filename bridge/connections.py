"""Connections to NATS and Redis, made in one place: TLS, credentials, and clear errors.

Every NATS and Redis connection of koprs-bridge (the sinks, the leader election's Redis client,
``koprs-bridge status``, the consumers and ``koprs-bridge tail``) is made here, from a URL plus
an optional :class:`~bridge.connection_settings.TlsConfig` and
:class:`~bridge.connection_settings.AuthConfig`:

* :func:`ssl_context`: an :class:`ssl.SSLContext` from a ``TlsConfig`` (custom CA, client
  certificate for mutual TLS, ``verify: false``), from the cache of :mod:`bridge.tls` shared
  with the HTTP sources. It is built again when one of its files changes, so rotated
  certificates are picked up by the next connection.
* :func:`nats_options` / :func:`connect_nats`: the keyword arguments of ``nats.connect`` and a
  connect that fails fast. TLS is *required* when the URL is ``tls://`` or a ``tls`` section is
  given: a server that does not offer TLS is refused before any credential is sent (nats-py
  alone would fall back to plaintext). Passwords and tokens are passed as callables that read
  the :class:`~bridge.secrets.Secret` again on every (re)connection, so a rotated ``{file:}``
  secret is used at the next attempt; nkey seed and ``.creds`` files are read by nats-py at
  each connection too.
* :func:`redis_client`: a ``redis.asyncio.Redis``; TLS for ``rediss://`` or a ``tls`` section,
  ACL ``username``/``password`` from the ``AuthConfig`` (else from the URL), read again for
  every new connection; :func:`redis_session`: one for a short job (``koprs-bridge status``,
  ``tail``), its errors in words.
* :func:`describe_error` (:mod:`bridge.connection_errors`): the cause of a failed connection or
  command in words, with a hint at the setting to fix; no secret ever appears in it.
* ``keep_cancellation`` lives in :mod:`bridge.aio` (re-exported here).

A NATS connect makes one attempt per server: on the first failure of every server (or after
``connect_timeout_s``) :func:`connect_nats` gives up with a :class:`ConnectError`, so the
caller's own backoff decides when to try again and each try logs one warning (nats-py's own
initial connect would retry silently forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from nats.aio.client import Client as NatsClient
from redis.asyncio.connection import (
    BlockingConnectionPool,
    Connection,
    ConnectionPool,
    parse_url,
)
from redis.asyncio.sentinel import SentinelManagedConnection
from redis.credentials import CredentialProvider

from bridge.aio import keep_cancellation
from bridge.connection_errors import (
    ClientCertificateRequired,
    ConnectError,
    TlsNotOffered,
    describe_error,
)
from bridge.connection_settings import AuthConfig, RedisAuthConfig, TlsConfig
from bridge.errors import BridgeError, ConfigError
from bridge.secrets import Secret, redact_url
from bridge.tls import client_context

__all__ = [
    "ConnectError",
    "connect_nats",
    "describe_error",
    "keep_cancellation",
    "nats_options",
    "nats_servers",
    "nats_tls_required",
    "redis_client",
    "redis_session",
    "redis_tls_required",
    "ssl_context",
]

ErrorCallback = Callable[[Exception], Awaitable[None]]
Callback = Callable[[], Awaitable[None]]


# -- TLS ----------------------------------------------------------------------------------------


def ssl_context(tls: TlsConfig | None = None) -> ssl.SSLContext:
    """The client-side SSL context ``tls`` describes (None: system CAs, verification on).

    Shared per config and built again when one of its files changed (certificate rotation),
    by :func:`bridge.tls.client_context`. Unreadable or invalid files are a
    :class:`~bridge.errors.ConfigError` naming the file.
    """
    tls = tls or TlsConfig()
    return client_context(
        verify=tls.verify,
        ca_file=tls.ca_file,
        cert_file=tls.cert_file,
        key_file=tls.key_file,
        default_ca="system",
        errors="config",
    )


# -- NATS ---------------------------------------------------------------------------------------


def nats_servers(url: str) -> list[str]:
    """The server URLs of a comma-separated NATS URL list."""
    return [part.strip() for part in url.split(",") if part.strip()]


def nats_tls_required(url: str, tls: TlsConfig | None) -> bool:
    """Whether TLS must be used: a ``tls://`` URL or a ``tls`` section."""
    return tls is not None or any(s.lower().startswith("tls://") for s in nats_servers(url))


def nats_options(
    url: str, tls: TlsConfig | None = None, auth: AuthConfig | None = None
) -> dict[str, Any]:
    """Keyword arguments of ``nats.connect`` (``Client.connect``) for TLS and credentials.

    ``servers``; ``tls``, the SSL context of ``tls`` (used when the URL is ``tls://``, when
    the server requires TLS, or, through :func:`connect_nats`, whenever ``tls`` is given);
    ``tls_hostname`` from ``tls.server_name``; one of ``user``/``password``, ``token``,
    ``nkeys_seed`` or ``user_credentials`` from ``auth`` (credentials in the URL work as nats-py
    handles them). Secrets are callables that read the secret at each connection.
    """
    options: dict[str, Any] = {"servers": nats_servers(url)}
    # nats:// upgrades to TLS when the server requires it: our context (CA, client certificate)
    # serves that case too; _NatsClient decides whether TLS is mandatory
    options["tls"] = ssl_context(tls)
    if tls is not None and tls.server_name:
        options["tls_hostname"] = tls.server_name
    if auth is not None:
        if auth.password is not None:
            options["user"] = auth.username or ""
            options["password"] = _reader(auth.password)
        elif auth.token is not None:
            options["token"] = _reader(auth.token)
        elif auth.nkey_seed_file is not None:
            options["nkeys_seed"] = str(auth.nkey_seed_file)
        elif auth.creds_file is not None:
            options["user_credentials"] = str(auth.creds_file)
    return options


def _reader(secret: Secret) -> Callable[[], str]:
    def read() -> str:
        return secret.reveal()

    return read


class _NatsClient(NatsClient):
    """nats-py's client, refusing a plaintext connection when TLS is required, and saying so
    when the server requires a client certificate and none is configured (the server would
    just drop the connection after the handshake)."""

    require_tls = False
    has_client_certificate = False

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        # called with the server's first INFO, before the TLS upgrade and before CONNECT
        if initial_connection:
            if self.require_tls and not info.get("tls_required"):
                if not info.get("tls_available"):
                    raise TlsNotOffered
                info["tls_required"] = True  # the server allows TLS: upgrade
            if info.get("tls_verify") and not self.has_client_certificate:
                raise ClientCertificateRequired
        await super()._process_info(info, initial_connection)


async def connect_nats(
    url: str,
    tls: TlsConfig | None = None,
    auth: AuthConfig | None = None,
    *,
    name: str = "koprs-bridge",
    connect_timeout_s: float = 5.0,
    reconnect_wait_s: float = 1.0,
    error_cb: ErrorCallback | None = None,
    disconnected_cb: Callback | None = None,
    reconnected_cb: Callback | None = None,
    closed_cb: Callback | None = None,
    **options: Any,
) -> NatsClient:
    """A connected NATS client that reconnects forever once connected.

    Raises :class:`ConnectError` when every server failed once (refused the connection or the
    credentials, failed the TLS handshake...) or nothing answered within ``connect_timeout_s``;
    nothing is left running then. ``error_cb`` gets the errors after the first connection
    (reconnection failures, permission violations); ``options`` go to ``Client.connect``.
    """
    where = redact_url(url)
    try:
        connect_options = nats_options(url, tls, auth)
    except ConfigError as exc:
        raise ConnectError(f"cannot connect to NATS {where}: {exc}") from exc
    servers = max(1, len(connect_options["servers"]))
    nc = _NatsClient()
    nc.require_tls = nats_tls_required(url, tls)
    nc.has_client_certificate = tls is not None and tls.cert_file is not None
    failures: list[BaseException] = []
    failed = asyncio.Event()
    connecting = True

    async def on_error(exc: Exception) -> None:
        if connecting:
            failures.append(exc)
            if len(failures) >= servers:
                failed.set()
        elif error_cb is not None:
            await error_cb(exc)

    connect = asyncio.ensure_future(
        nc.connect(
            **connect_options,
            name=name,
            connect_timeout=max(1, round(connect_timeout_s)),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=reconnect_wait_s,  # type: ignore[arg-type]
            error_cb=on_error,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            closed_cb=closed_cb,
            **options,
        )
    )
    gave_up = asyncio.ensure_future(failed.wait())
    cause: BaseException | None = None
    try:
        done, _ = await asyncio.wait(
            {connect, gave_up}, timeout=connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if connect in done and connect.exception() is None:
            connecting = False
            return nc
        if failures:  # what the server said, rather than an error of nats-py's clean-up
            cause = next(
                (f for f in failures if not isinstance(f, BrokenPipeError | ConnectionResetError)),
                failures[-1],
            )
        elif connect in done:
            cause = connect.exception()
        else:
            cause = TimeoutError(f"no answer within {connect_timeout_s:g} s")
    finally:
        gave_up.cancel()
        if connecting:  # failed, or cancelled: leave nothing behind
            connect.cancel()
            await asyncio.gather(connect, gave_up, return_exceptions=True)
            with contextlib.suppress(Exception):
                await nc.close()
    raise ConnectError(f"cannot connect to NATS {where}: {describe_error(cause)}") from cause


# -- Redis --------------------------------------------------------------------------------------


try:  # no CLIENT SETINFO on connect: one command less for the ACL, and Redis < 7.2 lacks it
    import redis.driver_info

    _NO_CLIENT_INFO: dict[str, Any] = {"driver_info": None}
except ImportError:  # pragma: no cover - older redis-py
    _NO_CLIENT_INFO = {"lib_name": None, "lib_version": None}


def redis_tls_required(url: str, tls: TlsConfig | None) -> bool:
    """Whether TLS is used: a ``rediss://`` URL or a ``tls`` section."""
    return tls is not None or urlsplit(url).scheme.lower() in (
        "rediss",
        "rediss+cluster",
        "rediss+sentinel",
    )


class _Credentials(CredentialProvider):
    """ACL user and password, the password read again for every new connection."""

    def __init__(self, username: str | None, password: Secret | str) -> None:
        self.username = username
        self.password = password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self.password if isinstance(self.password, str) else self.password.reveal()
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


class TlsConnection(Connection):
    """A Redis TCP connection over TLS with a context from :func:`ssl_context`."""

    def __init__(self, *, tls_config: TlsConfig | None = None, **kwargs: Any) -> None:
        self.tls_config = tls_config
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())
        arguments["ssl"] = ssl_context(self.tls_config)
        if self.tls_config is not None and self.tls_config.server_name:
            arguments["server_hostname"] = self.tls_config.server_name
        return arguments


@contextlib.asynccontextmanager
async def redis_session(
    url: str,
    tls: TlsConfig | None = None,
    auth: RedisAuthConfig | None = None,
    *,
    doing: str,
    timeout_s: float = 10.0,
) -> AsyncIterator[redis.asyncio.Redis]:
    """A :func:`redis_client` for a short job (``timeout_s`` to connect and per command),
    closed after it. A Redis or network error in the block becomes a
    :class:`~bridge.errors.BridgeError`: ``cannot <doing> <url>: <cause>`` (password hidden)."""
    client = redis_client(
        url, tls, auth, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        yield client
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BridgeError(f"cannot {doing} {redact_url(url)}: {describe_error(exc)}") from exc
    finally:
        await client.aclose()


class TlsSentinelConnection(SentinelManagedConnection):
    """A connection to the primary a Sentinel names, over TLS with a context from
    :func:`ssl_context`."""

    def __init__(self, *, tls_config: TlsConfig | None = None, **kwargs: Any) -> None:
        self.tls_config = tls_config
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())
        arguments["ssl"] = ssl_context(self.tls_config)
        if self.tls_config is not None and self.tls_config.server_name:
            arguments["server_hostname"] = self.tls_config.server_name
        return arguments


def redis_client(
    url: str,
    tls: TlsConfig | None = None,
    auth: RedisAuthConfig | None = None,
    *,
    pool_timeout_s: float | None = None,
    **options: Any,
) -> redis.asyncio.Redis:
    """A ``redis.asyncio.Redis`` for ``url`` (``redis://``, ``rediss://``, ``unix://``).

    ``options`` are those of ``Redis.from_url`` (timeouts, ``max_connections``, ``retry``...).
    ``auth`` overrides credentials in the URL. With ``pool_timeout_s``, a command waits up to
    that long for a free connection when all ``max_connections`` are busy, instead of failing
    at once ("Too many connections"). Nothing connects before the first command.
    ``redis+cluster://`` and ``redis+sentinel://`` URLs (and their ``rediss+`` forms) give a
    cluster client or a client of the Sentinel-named primary: :mod:`bridge.connections_redis`
    (``pool_timeout_s`` applies to a single server only).
    """
    if "+" in urlsplit(url).scheme:
        from bridge.connections_redis import clustered_client
        from bridge.redis_urls import parse_redis_url

        target = parse_redis_url(url)
        provider = None
        if auth is not None and auth.password is not None:
            provider = _Credentials(auth.username, auth.password)
        elif target.password is not None:
            provider = _Credentials(target.username, target.password)
        return clustered_client(
            url,
            tls,
            provider,
            {**options},
            tls_connection=TlsConnection,
            tls_sentinel_connection=TlsSentinelConnection,
        )
    try:
        kwargs: dict[str, Any] = {**_NO_CLIENT_INFO, **options, **parse_url(url)}
    except ValueError as exc:
        raise ConfigError(f"Redis URL {redact_url(url)!r}: {exc}") from None
    username = kwargs.pop("username", None)
    password = kwargs.pop("password", None)
    if auth is not None and auth.password is not None:
        username, password = auth.username, auth.password
    elif auth is not None and auth.username:
        username = auth.username
    if password is not None:
        kwargs["credential_provider"] = _Credentials(username, password)
    elif username:
        kwargs["username"] = username  # ACL user without password ("nopass")
    if kwargs.get("connection_class") is not None and "path" in kwargs:
        if tls is not None:
            raise ConfigError(f"Redis URL {redact_url(url)!r}: no TLS over a unix socket")
    elif redis_tls_required(url, tls):
        kwargs["connection_class"] = TlsConnection
        kwargs["tls_config"] = tls
    if pool_timeout_s is not None:
        return redis.asyncio.Redis.from_pool(
            BlockingConnectionPool(timeout=pool_timeout_s, **kwargs)
        )
    return redis.asyncio.Redis.from_pool(ConnectionPool(**kwargs))
