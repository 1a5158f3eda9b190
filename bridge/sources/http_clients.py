"""Pooled ``httpx`` clients shared by the HTTP sources of a service, per origin and settings.

A client of its own per source costs a connection pool, a transport and (idle between polls) a
connection each: at 10,000 sources, a large part of a replica's memory, and one TCP connection
per source held open at the server. Sources watching one origin need none of that to
themselves: :class:`HttpClients` hands them shared clients whose idle connections outlive the
poll interval, so the polls of the sources to an origin take turns on a few warm connections.

Sources share a client only when nothing about the connections differs for them: the origin
(scheme, host, port), the TLS context (CA, client certificate, verification: contexts are
themselves shared, see :func:`bridge.sources.http_auth.tls_context`), the name the certificate
must carry (``server_name``, sent as SNI) and the keep-alive expiry (from the interval).
Everything else a source sends is per request (credentials, validators, timeouts), so it is
no reason to split.

A client serves at most :data:`SOURCES_PER_CLIENT` sources; an origin with more gets more
clients. httpcore's pool walks all its connections on every request it starts and ends (a
readability check per idle connection, and a count of them per idle one), so one pool for
10,000 sources, with hundreds of connections, spent more CPU per poll than the poll itself and
fell behind. A client has as many connections as it has sources at most, so no poll waits for
a connection where its own client would not have: it has ``min(sources, max_connections)``.

:meth:`HttpClients.lease` counts the sources of a client; :meth:`SharedClient.release` (the
poller's ``aclose()``) closes the client when the last of them is released. The client itself
is made at the first request, inside the event loop that uses it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import httpx

from bridge.sources.http_auth import origin

__all__ = [
    "DEFAULT_TIMEOUT",
    "SOURCES_PER_CLIENT",
    "ClientKey",
    "HttpClients",
    "SharedClient",
    "http_limits",
]

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
"""Each connect, read and write of a request at most (unless the poller says otherwise)."""
DEFAULT_MAX_CONNECTIONS = 256
"""The most connections of one client (the service default of ``max_concurrent_polls``)."""
SOURCES_PER_CLIENT = 32
"""The most sources one client serves (see the module docstring): with 32, httpcore's walk of
the pool stays well below the cost of a poll; 10,000 sources to one origin take 313 clients."""


def http_limits(interval_s: float, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> httpx.Limits:
    """The connection limits of a client polled every ``interval_s``: idle connections outlive
    the interval (httpx's default keep-alive expiry, 5 s, would close them before each poll at
    10 s and make every poll connect again), so steady-state polls reuse them, unless the
    server closed them; as many may stay idle as may be busy."""
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=keepalive_expiry(interval_s),
    )


def keepalive_expiry(interval_s: float) -> float:
    """How long an idle connection of sources polled every ``interval_s`` is kept."""
    return 2 * interval_s + 5.0


@dataclass(frozen=True, slots=True)
class ClientKey:
    """What sources sharing one client have in common."""

    origin: tuple[str, str, int | None]
    verify: ssl.SSLContext
    server_name: str | None
    keepalive_expiry: float

    def __str__(self) -> str:
        scheme, host, port = self.origin
        return f"{scheme}://{host}:{port}"


@dataclass(eq=False, slots=True)
class _Shared:
    """One shared client and the count of the sources holding it."""

    key: ClientKey
    sources: int = 0
    client: httpx.AsyncClient | None = field(default=None, repr=False)


class SharedClient:
    """One source's hold on a shared client; :meth:`release` it when the source stops."""

    __slots__ = ("_clients", "_shared")

    def __init__(self, clients: HttpClients, shared: _Shared) -> None:
        self._clients = clients
        self._shared: _Shared | None = shared

    @property
    def client(self) -> httpx.AsyncClient:
        """The client (made at the first use)."""
        if self._shared is None:
            raise RuntimeError("this hold on a shared HTTP client was released")
        return self._clients._client(self._shared)

    async def release(self) -> None:
        """Give the client up; the last source to give it up closes it. Idempotent."""
        shared, self._shared = self._shared, None
        if shared is not None:
            await self._clients._release(shared)


class HttpClients:
    """The shared clients of a service's HTTP sources (see the module docstring).

    ``max_connections``: the most connections of one client (a service passes its
    ``max_concurrent_polls``); ``sources_per_client``: the most sources one client serves.
    """

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        sources_per_client: int = SOURCES_PER_CLIENT,
    ) -> None:
        if max_connections < 1 or sources_per_client < 1:
            raise ValueError(
                f"max_connections ({max_connections!r}) and sources_per_client "
                f"({sources_per_client!r}) must be >= 1"
            )
        self.max_connections = max_connections
        self.sources_per_client = sources_per_client
        self._shared: dict[ClientKey, list[_Shared]] = {}

    def lease(
        self,
        url: str,
        *,
        verify: ssl.SSLContext,
        interval_s: float,
        server_name: str | None = None,
    ) -> SharedClient:
        """A hold on a client for ``url``'s origin with these settings, shared with other
        sources holding one for the same (see :class:`ClientKey`), up to
        ``sources_per_client`` of them."""
        key = ClientKey(origin(httpx.URL(url)), verify, server_name, keepalive_expiry(interval_s))
        clients = self._shared.setdefault(key, [])
        shared = next((c for c in clients if c.sources < self.sources_per_client), None)
        if shared is None:
            shared = _Shared(key)
            clients.append(shared)
        shared.sources += 1
        return SharedClient(self, shared)

    @property
    def clients(self) -> int:
        """Clients with at least one source (made or not yet)."""
        return sum(len(clients) for clients in self._shared.values())

    def _client(self, shared: _Shared) -> httpx.AsyncClient:
        if shared.client is None:
            connections = min(self.max_connections, self.sources_per_client)
            shared.client = httpx.AsyncClient(
                verify=shared.key.verify,
                timeout=DEFAULT_TIMEOUT,
                limits=httpx.Limits(
                    max_connections=connections,
                    max_keepalive_connections=connections,
                    keepalive_expiry=shared.key.keepalive_expiry,
                ),
                follow_redirects=False,  # the poller follows redirects itself, by its own rules
            )
        return shared.client

    async def _release(self, shared: _Shared) -> None:
        shared.sources -= 1
        if shared.sources > 0:
            return
        clients = self._shared[shared.key]
        clients.remove(shared)
        if not clients:
            del self._shared[shared.key]
        if shared.client is not None:
            await shared.client.aclose()
