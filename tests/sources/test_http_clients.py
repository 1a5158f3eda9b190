"""HTTP sources share one pooled client per origin (:mod:`bridge.sources.http_clients`).

Against a loopback server that records the client port of every request: the polls of several
sources to one origin travel over one connection, across polls; its idle connections outlive
the interval (httpx's default keep-alive expiry, 5 s, closed them before every poll at 10 s);
what a source sends stays its own (credentials); sources whose connections would differ (TLS,
server name, origin) get clients of their own; the client closes when its last source stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bridge.errors import BodyTooLargeError
from bridge.service.config import SourceConfig, parse_config
from bridge.service.factories import build_source
from bridge.service.runner import Bridge
from bridge.sinks.memory import MemorySink
from bridge.sources.http import HttpPoller, tls_context
from bridge.sources.http_clients import HttpClients
from bridge.state import MemoryStateStore
from tests.support.httpserver import Document, HttpTestServer
from tests.support.replicas import until


@pytest.fixture
def server() -> Iterator[HttpTestServer]:
    with HttpTestServer() as running:
        yield running


def config(sources: list[dict[str, Any]], **more: Any) -> Any:
    return parse_config(
        {"broker": {"url": "nats://127.0.0.1:1"}, "sources": sources, **more}, env={}
    )


def http_source(name: str, url: str, interval_s: float = 10.0, **http: Any) -> dict[str, Any]:
    return {"name": name, "interval": interval_s, "http": {"url": url, **http}}


def pollers(sources: tuple[SourceConfig, ...], clients: HttpClients) -> list[HttpPoller]:
    built = [build_source(source, clients).source for source in sources]
    assert all(isinstance(p, HttpPoller) for p in built)
    return built  # type: ignore[return-value]


def documents(server: HttpTestServer, count: int) -> list[str]:
    return [
        server.route(f"/d{i}", Document(b"document %d" % i, etag=f'"v{i}"')) for i in range(count)
    ]


async def test_sources_to_one_origin_poll_over_one_connection(server: HttpTestServer) -> None:
    urls = documents(server, 3)
    clients = HttpClients()
    polled = pollers(config([http_source(f"s{i}", u) for i, u in enumerate(urls)]).sources, clients)
    try:
        for _ in range(3):
            for poller in polled:
                await poller.poll()
    finally:
        for poller in polled:
            await poller.aclose()
    exchanges = server.exchanges
    assert [e.status for e in exchanges] == [200] * 3 + [304] * 6
    assert len({e.connection for e in exchanges}) == 1
    assert clients.clients == 0


async def test_a_bridge_shares_one_client_per_origin_and_closes_it_at_the_end(
    server: HttpTestServer,
) -> None:
    urls = documents(server, 3)
    sources = [http_source(f"s{i}", u, interval_s=0.05) for i, u in enumerate(urls)]
    bridge = Bridge(
        config(sources, max_concurrent_polls=1),  # one poll at a time: one connection needed
        sink=MemorySink(),
        state=MemoryStateStore(),
        replica="r1",
    )
    assert bridge.http_clients.clients == 1
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await until(
            lambda: (
                len(bridge.loops) == 3 and all(loop.steps >= 3 for loop in bridge.loops.values())
            ),
            "every source polled three times",
        )
    finally:
        stop.set()
        await task
    exchanges = server.exchanges
    assert len(exchanges) >= 9
    assert len({e.connection for e in exchanges}) == 1
    assert bridge.http_clients.clients == 0


async def test_a_shared_client_closes_when_its_last_source_stops(server: HttpTestServer) -> None:
    urls = documents(server, 2)
    clients = HttpClients()
    first, second = pollers(
        config([http_source("a", urls[0]), http_source("b", urls[1])]).sources, clients
    )
    await first.poll()
    await second.poll()
    client = first._http()
    assert second._http() is client
    await first.aclose()
    assert not client.is_closed
    await second.poll()  # the other source polls on, over the same connection
    await second.aclose()
    assert client.is_closed
    assert clients.clients == 0
    assert len({e.connection for e in server.exchanges}) == 1
    again = pollers(config([http_source("a", urls[0])]).sources, clients)[0]
    try:
        assert again._http() is not client  # a source added later gets a new one
        await again.poll()
    finally:
        await again.aclose()


@pytest.mark.parametrize("interval_s", [0.5, 10, 30, 300])
async def test_the_connections_of_a_client_outlive_the_interval(interval_s: float) -> None:
    clients = HttpClients(max_connections=8)
    (poller,) = pollers(
        config([http_source("doc", "http://127.0.0.1:1/doc", interval_s)]).sources, clients
    )
    try:
        pool = poller._http()._transport._pool  # type: ignore[attr-defined]
        assert pool._keepalive_expiry > interval_s * 1.5
        assert pool._max_connections == pool._max_keepalive_connections == 8
    finally:
        await poller.aclose()


async def test_what_a_source_sends_stays_its_own_on_a_shared_client(
    server: HttpTestServer,
) -> None:
    urls = documents(server, 2)
    sources = config(
        [
            http_source(
                "a", urls[0], bearer_token="t0ken", headers={"X-Tenant": "a"}, max_body_bytes=1
            ),
            http_source("b", urls[1], timeout=3),
        ]
    ).sources
    clients = HttpClients()
    first, second = pollers(sources, clients)
    try:
        assert clients.clients == 1  # credentials, caps and timeouts are per request
        await second.poll()
        with pytest.raises(BodyTooLargeError, match=r"source 'a': .*/d0"):
            await first.poll()  # its 1-byte cap, not the other source's
    finally:
        await first.aclose()
        await second.aclose()
    to_a, to_b = server.requests_to("/d0")[0], server.requests_to("/d1")[0]
    assert to_a.headers["authorization"] == "Bearer t0ken"
    assert to_a.headers["x-tenant"] == "a"
    assert "authorization" not in to_b.headers
    assert "x-tenant" not in to_b.headers
    assert to_a.connection == to_b.connection


async def test_sources_whose_connections_differ_get_clients_of_their_own() -> None:
    clients = HttpClients()
    base = "http://127.0.0.1:8080/x"
    leases = [
        clients.lease(base, verify=tls_context(), interval_s=10),
        clients.lease("http://127.0.0.1:8080/other?q=1", verify=tls_context(), interval_s=10),
    ]
    assert clients.clients == 1  # same origin, same settings
    leases += [
        clients.lease("http://127.0.0.1:8081/x", verify=tls_context(), interval_s=10),
        clients.lease("https://127.0.0.1:8080/x", verify=tls_context(), interval_s=10),
        clients.lease("http://localhost:8080/x", verify=tls_context(), interval_s=10),
        clients.lease(base, verify=tls_context(verify=False), interval_s=10),
        clients.lease(base, verify=tls_context(), interval_s=10, server_name="other.example"),
        clients.lease(base, verify=tls_context(), interval_s=300),
    ]
    assert clients.clients == 7
    assert leases[0].client is leases[1].client
    assert len({id(lease.client) for lease in leases}) == 7
    for lease in leases:
        await lease.release()
        await lease.release()  # idempotent
    assert clients.clients == 0
    with pytest.raises(RuntimeError, match="released"):
        _ = leases[0].client


async def test_an_origin_with_many_sources_gets_a_client_per_few_of_them() -> None:
    """httpcore's pool walks all its connections at every request: a client serves a
    bounded number of sources, and has at most as many connections."""
    clients = HttpClients(sources_per_client=2, max_connections=8)
    url, ctx = "http://127.0.0.1:8080/x", tls_context()
    leases = [clients.lease(url, verify=ctx, interval_s=10) for _ in range(5)]
    assert clients.clients == 3
    assert [id(lease.client) for lease in leases].count(id(leases[0].client)) == 2
    pool = leases[0].client._transport._pool  # type: ignore[attr-defined]
    assert pool._max_connections == 2
    await leases[1].release()
    refill = clients.lease(url, verify=ctx, interval_s=10)  # the free place first
    assert refill.client is leases[0].client
    assert clients.clients == 3
    for lease in [*leases, refill]:
        await lease.release()
    assert clients.clients == 0


async def test_a_poller_with_its_own_client_keeps_it(server: HttpTestServer) -> None:
    url = documents(server, 1)[0]
    async with httpx.AsyncClient() as own:
        poller = HttpPoller(url).with_client(own)
        await poller.poll()
        await poller.aclose()
        assert not own.is_closed  # the caller's to close
        clients = HttpClients()
        with pytest.raises(RuntimeError, match="client already"):
            poller.with_shared_client(clients.lease(url, verify=tls_context(), interval_s=1))
