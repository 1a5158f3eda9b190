"""Pooled ``httpx`` clients shared by the HTTP sources of a service: one per origin and settings.

A client of its own per source costs a connection pool, a transport and (idle between polls) a
connection each: at 10,000 sources, most of a replica's memory, and one TCP connection per
source held open at the server. Sources watching one origin need none of that to themselves:
:class:`HttpClients` hands them one client, whose pool is sized for the polls in flight at
once (``max_concurrent_polls``) and whose idle connections outlive the poll interval, so the
polls of every source to that origin take turns on a few warm connections.

Sources share a client only when nothing about the connections differs for them: the origin
(scheme, host, port), the TLS context (CA, client certificate, verification: contexts are
themselves shared, see :func:`bridge.sources.http_auth.tls_context`), the name the certificate
must carry (``server_name``, sent as SNI) and the keep-alive expiry (from the interval).
Everything else a source sends is per request (credentials, validators, timeouts), so it is
not a reason to split.

:meth:`HttpClients.lease` counts the sources of a client; :meth:`SharedClient.release` (the
poller's ``aclose()``) closes the client when the last of them is released. The client itself
is made at the first request, inside the event loop that uses it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx

from bridge.sources.http_auth import origin

__all__ = ["DEFAULT_TIMEOUT", "ClientKey", "HttpClients", "SharedClient", "http_limits"]

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
"""Each connect, read and write of a request at most (unless the poller says otherwise)."""

DEFAULT_MAX_CONNECTIONS = 256
"""Connections of one shared client (the service default of ``max_concurrent_polls``: a poll
never waits for a connection the service's own bound lets it have)."""


def http_limits(interval_s: float, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> httpx.Limits:
    """The connection limits of a client polled every ``interval_s``: idle connections outlive
    the interval (httpx's default keep-alive expiry, 5 s, would close them before each poll at
    10 s and make every poll connect again), so steady-state polls reuse them, unless the
    server closed them; as many may stay idle as may be busy."""
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=2 * interval_s + 5.0,
    )


@dataclass(frozen=True, slots=True)
class ClientKey:
    """What sources sharing one client have in common."""

    origin: tuple[str, str, int | None]
    verify: ssl.SSLContext
    server_name: str | None
    keepalive_expiry: float


class SharedClient:
    """One source's hold on a shared client; :meth:`release` it when the source stops."""

    __slots__ = ("_clients", "_released", "key")

    def __init__(self, clients: HttpClients, key: ClientKey) -> None:
        self._clients = clients
        self._released = False
        self.key = key

    @property
    def client(self) -> httpx.AsyncClient:
        """The client (made at the first use)."""
        if self._released:
            raise RuntimeError(f"the shared HTTP client of {_describe(self.key)} was released")
        return self._clients._client(self.key)

    async def release(self) -> None:
        """Give the client up; the last source to give it up closes it. Idempotent."""
        if not self._released:
            self._released = True
            await self._clients._release(self.key)


@dataclass(slots=True)
class _Entry:
    sources: int
    client: httpx.AsyncClient | None = None


class HttpClients:
    """The shared clients of a service's HTTP sources (see the module docstring)."""

    def __init__(self, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        self.max_connections = max_connections
        self._entries: dict[ClientKey, _Entry] = {}

    def lease(
        self,
        url: str,
        *,
        verify: ssl.SSLContext,
        interval_s: float,
        server_name: str | None = None,
    ) -> SharedClient:
        """A hold on the client for ``url``'s origin with these settings, shared with every
        other source holding one for the same (see :class:`ClientKey`)."""
        limits = http_limits(interval_s, self.max_connections)
        assert limits.keepalive_expiry is not None
        key = ClientKey(origin(httpx.URL(url)), verify, server_name, limits.keepalive_expiry)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(0)
        entry.sources += 1
        return SharedClient(self, key)

    @property
    def clients(self) -> int:
        """Clients with at least one source (made or not yet)."""
        return len(self._entries)

    def sources(self, key: ClientKey) -> int:
        """The sources holding the client of ``key`` (0: none, it is closed)."""
        entry = self._entries.get(key)
        return entry.sources if entry is not None else 0

    def _client(self, key: ClientKey) -> httpx.AsyncClient:
        entry = self._entries[key]
        if entry.client is None:
            entry.client = httpx.AsyncClient(
                verify=key.verify,
                timeout=DEFAULT_TIMEOUT,
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                    keepalive_expiry=key.keepalive_expiry,
                ),
                follow_redirects=False,  # the poller follows redirects itself, by its own rules
            )
        return entry.client

    async def _release(self, key: ClientKey) -> None:
        entry = self._entries[key]
        entry.sources -= 1
        if entry.sources == 0:
            del self._entries[key]
            if entry.client is not None:
                await entry.client.aclose()


def _describe(key: ClientKey) -> str:
    scheme, host, port = key.origin
    return f"{scheme}://{host}:{port}"
