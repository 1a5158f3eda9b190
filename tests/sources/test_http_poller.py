"""``HttpPoller`` against real HTTP servers on 127.0.0.1.

Most tests use the scriptable :class:`~tests.support.httpserver.HttpTestServer`; the static-file
servers (Python's ``SimpleHTTPRequestHandler`` for Last-Modified, nginx for ETags) check the
poller against validators the servers compute themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge import (
    Added,
    BodyTooLargeError,
    HttpPoller,
    HttpResource,
    HttpStatusError,
    Modified,
    Removed,
    SourceError,
    SourceUnavailableError,
    watch_external,
)
from bridge.sources.http import DEFAULT_MAX_BODY_BYTES, DEFAULT_TIMEOUT
from tests.support import containers
from tests.support.httpserver import (
    Document,
    Exchange,
    HttpTestServer,
    NginxServer,
    Reply,
    StaticFileServer,
    nginx_binary,
)
from tests.support.servers import LOOPBACK, free_port

DATE_1 = "Mon, 01 Jan 2024 00:00:00 GMT"
DATE_2 = "Tue, 02 Jan 2024 00:00:00 GMT"


@pytest.fixture
def server() -> Iterator[HttpTestServer]:
    with HttpTestServer() as running:
        yield running


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- first success, conditional requests, changes ------------------------------------------


async def test_first_200_is_added_with_the_whole_response(server: HttpTestServer) -> None:
    body = b'{"a": 1}'
    url = server.route("/config.json", Document(body, etag='"v1"', last_modified=DATE_1))
    async with HttpPoller(url) as poller:
        events = await poller.poll()
    assert events == [
        Added(
            HttpResource(
                url=url,
                status=200,
                body=body,
                etag='"v1"',
                last_modified=DATE_1,
                content_type="application/json",
            )
        )
    ]
    resource = events[0].resource
    assert resource.digest == sha256(body)
    assert resource.key == url
    assert resource.version == f"sha256:{sha256(body)}"
    (request,) = server.requests_to("/config.json")
    assert "if-none-match" not in request.headers
    assert "if-modified-since" not in request.headers


async def test_unchanged_with_etag_sends_if_none_match_and_304_is_no_event(
    server: HttpTestServer,
) -> None:
    url = server.route("/c", Document(b"one", etag='"v1"', last_modified=DATE_1))
    async with HttpPoller(url) as poller:
        assert len(await poller.poll()) == 1
        assert await poller.poll() == []
        assert await poller.poll() == []
    first, second, third = server.requests_to("/c")
    assert first.status == 200
    for conditional in (second, third):
        assert conditional.headers["if-none-match"] == '"v1"'
        assert "if-modified-since" not in conditional.headers  # the ETag wins
        assert conditional.status == 304


async def test_polls_answered_without_a_body_keep_their_connection(
    server: HttpTestServer,
) -> None:
    """A 304 or 404 that nobody reads to its end would close its connection: the next poll
    would connect again (a TCP and maybe a TLS handshake per poll)."""
    doc = Document(b"one", etag='"v1"')
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        assert len(await poller.poll()) == 1
        for _ in range(3):
            assert await poller.poll() == []  # 304
        doc.status = 404
        assert len(await poller.poll()) == 1  # Removed
        assert await poller.poll() == []  # 404 again
    requests = server.requests_to("/c")
    assert [r.status for r in requests] == [200, 304, 304, 304, 404, 404]
    assert len({r.connection for r in requests}) == 1


async def test_changed_content_is_modified_once(server: HttpTestServer) -> None:
    doc = Document(b"one", etag='"v1"')
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        await poller.poll()
        doc.body, doc.etag = b"two", '"v2"'
        events = await poller.poll()
        assert events == [
            Modified(HttpResource(url, 200, b"two", '"v2"', None, "application/json"))
        ]
        assert await poller.poll() == []
    assert [e.headers.get("if-none-match") for e in server.requests_to("/c")] == [
        None,
        '"v1"',
        '"v2"',
    ]


async def test_new_etag_with_the_same_body_is_no_event(server: HttpTestServer) -> None:
    doc = Document(b"same", etag='"v1"')
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        await poller.poll()
        doc.etag = '"v2"'  # e.g. a redeploy that recomputes ETags
        assert await poller.poll() == []
        assert poller.state()["etag"] == '"v2"'  # but the new validator is used from now on
        assert await poller.poll() == []
    assert server.requests_to("/c")[-1].headers["if-none-match"] == '"v2"'
    assert server.requests_to("/c")[-1].status == 304


async def test_last_modified_only_sends_if_modified_since(server: HttpTestServer) -> None:
    doc = Document(b"one", last_modified=DATE_1)
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        (added,) = await poller.poll()
        assert added.resource.last_modified == DATE_1
        assert added.resource.etag is None
        assert await poller.poll() == []
        doc.body, doc.last_modified = b"two", DATE_2
        assert await poller.poll() == [
            Modified(HttpResource(url, 200, b"two", None, DATE_2, "application/json"))
        ]
    requests = server.requests_to("/c")
    assert [r.headers.get("if-modified-since") for r in requests] == [None, DATE_1, DATE_1]
    assert [r.status for r in requests] == [200, 304, 200]
    assert all("if-none-match" not in r.headers for r in requests)


async def test_without_validators_the_body_digest_decides(server: HttpTestServer) -> None:
    doc = Document(b"one", content_type=None)
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        assert [type(e) for e in await poller.poll()] == [Added]
        for _ in range(3):  # the seed emitted Modified here on every poll
            assert await poller.poll() == []
        doc.body = b"two"
        (modified,) = await poller.poll()
        assert modified == Modified(HttpResource(url, 200, b"two"))
        assert await poller.poll() == []
    requests = server.requests_to("/c")
    assert len(requests) == 6
    assert all(r.status == 200 for r in requests)
    assert all("if-none-match" not in r.headers for r in requests)
    assert all("if-modified-since" not in r.headers for r in requests)


async def test_a_server_ignoring_conditionals_still_yields_no_event(
    server: HttpTestServer,
) -> None:
    def always_200(exchange: Exchange) -> Reply:
        return Reply(200, b"body", {"ETag": '"v1"'})

    url = server.route("/c", always_200)
    async with HttpPoller(url) as poller:
        assert len(await poller.poll()) == 1
        assert await poller.poll() == []
    assert server.requests_to("/c")[1].headers["if-none-match"] == '"v1"'


# -- removal -------------------------------------------------------------------------------


@pytest.mark.parametrize("gone", [404, 410])
async def test_gone_after_success_is_removed_with_the_last_resource(
    server: HttpTestServer, gone: int
) -> None:
    doc = Document(b"content", etag='"v1"', last_modified=DATE_1)
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        (added,) = await poller.poll()
        doc.status = gone
        assert await poller.poll() == [Removed(added.resource)]
        assert poller.state() == {}
        assert await poller.poll() == []  # removed once only
        doc.status = 200
        assert await poller.poll() == [Added(added.resource)]  # back again: Added
    requests = server.requests_to("/c")
    assert [r.status for r in requests] == [200, gone, gone, 200]
    # Once gone, the validators are forgotten: no conditional request for the comeback.
    assert "if-none-match" not in requests[3].headers


@pytest.mark.parametrize("gone", [404, 410])
async def test_gone_before_any_success_is_nothing(server: HttpTestServer, gone: int) -> None:
    doc = Document(b"later", status=gone)
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        assert await poller.poll() == []
        assert await poller.poll() == []
        assert poller.state() == {}
        doc.status = 200
        assert [type(e) for e in await poller.poll()] == [Added]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 418, 429, 500, 502, 503])
async def test_other_statuses_raise_http_status_error(server: HttpTestServer, status: int) -> None:
    url = server.route("/c", Document(status=status))
    async with HttpPoller(url) as poller:
        with pytest.raises(HttpStatusError) as caught:
            await poller.poll()
    assert caught.value.status == status
    assert caught.value.url == url
    assert url in str(caught.value)
    assert str(status) in str(caught.value)
    assert isinstance(caught.value, SourceError)


async def test_a_failed_poll_does_not_change_the_state(server: HttpTestServer) -> None:
    doc = Document(b"one", etag='"v1"')
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        await poller.poll()
        state = dict(poller.state())
        doc.status = 500
        with pytest.raises(HttpStatusError):
            await poller.poll()
        assert dict(poller.state()) == state
        doc.status = 200
        assert await poller.poll() == []
    assert server.requests_to("/c")[-1].headers["if-none-match"] == '"v1"'


async def test_connection_refused_is_source_unavailable() -> None:
    url = f"http://{LOOPBACK}:{free_port()}/config.json"  # nothing listens there
    async with HttpPoller(url) as poller:
        with pytest.raises(SourceUnavailableError, match=r"GET http://127\.0\.0\.1") as caught:
            await poller.poll()
    assert url in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert poller.state() == {}


async def test_a_read_timeout_is_source_unavailable(server: HttpTestServer) -> None:
    release = threading.Event()

    def hang(exchange: Exchange) -> Reply:
        release.wait(timeout=30)
        return Reply(200, b"too late")

    url = server.route("/slow", hang)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(0.05)) as client:
            poller = HttpPoller(url).with_client(client)
            with pytest.raises(SourceUnavailableError, match="ReadTimeout") as caught:
                await poller.poll()
    finally:
        release.set()
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


# -- the body cap --------------------------------------------------------------------------


async def test_body_over_the_cap_with_content_length(server: HttpTestServer) -> None:
    url = server.route("/big", Document(b"x" * 1001))
    async with HttpPoller(url).with_max_body_bytes(1000) as poller:
        with pytest.raises(BodyTooLargeError, match="cap of 1000 bytes") as caught:
            await poller.poll()
    assert caught.value.cap_bytes == 1000
    assert url in str(caught.value)
    assert poller.state() == {}


async def test_body_at_the_cap_is_accepted(server: HttpTestServer) -> None:
    url = server.route("/exact", Document(b"x" * 1000))
    async with HttpPoller(url).with_max_body_bytes(1000) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == b"x" * 1000


async def test_body_over_the_cap_without_length_chunked(server: HttpTestServer) -> None:
    def endless(exchange: Exchange) -> Reply:
        def chunks() -> Iterator[bytes]:
            for _ in range(1024):  # 16 MiB in all, far beyond the cap: the poller must stop
                yield b"y" * 16384

        return Reply(200, chunks=chunks())

    url = server.route("/stream", endless)
    async with HttpPoller(url).with_max_body_bytes(64 * 1024) as poller:
        with pytest.raises(BodyTooLargeError, match="cap of 65536 bytes"):
            await poller.poll()
    assert poller.state() == {}


async def test_chunked_body_within_the_cap_is_read_whole(server: HttpTestServer) -> None:
    def chunked(exchange: Exchange) -> Reply:
        return Reply(200, chunks=iter([b"part one, ", b"part two, ", b"part three"]))

    url = server.route("/chunked", chunked)
    async with HttpPoller(url).with_max_body_bytes(30) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == b"part one, part two, part three"


def test_the_default_cap_and_bad_caps() -> None:
    poller = HttpPoller("http://127.0.0.1/x")
    assert poller.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 16 * 1024 * 1024
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_body_bytes"):
            poller.with_max_body_bytes(bad)


# -- configuration: headers, client, timeouts, name ----------------------------------------


async def test_bearer_token_and_custom_headers_are_sent_on_every_request(
    server: HttpTestServer,
) -> None:
    url = server.route("/c", Document(b"x", etag='"v1"'))
    poller = HttpPoller(url).with_bearer_token("s3cret").with_header("X-Tenant", "blue")
    async with poller:
        await poller.poll()
        await poller.poll()
    requests = server.requests_to("/c")
    assert len(requests) == 2
    for request in requests:
        assert request.headers["authorization"] == "Bearer s3cret"
        assert request.headers["x-tenant"] == "blue"
    assert requests[1].headers["if-none-match"] == '"v1"'


async def test_with_client_uses_the_given_client_and_leaves_it_open(
    server: HttpTestServer,
) -> None:
    url = server.route("/c", Document(b"x"))
    async with httpx.AsyncClient(headers={"X-From-Client": "yes"}) as client:
        poller = HttpPoller(url).with_client(client).with_header("X-From-Poller", "also")
        await poller.poll()
        await poller.aclose()
        assert not client.is_closed  # the caller owns it
    (request,) = server.requests_to("/c")
    assert request.headers["x-from-client"] == "yes"
    assert request.headers["x-from-poller"] == "also"


async def test_with_client_uses_the_clients_transport() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"from the mock", headers={"ETag": '"m"'})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        poller = HttpPoller("http://config.invalid/x").with_client(client)
        (added,) = await poller.poll()
        assert await poller.poll() == []
    assert added.resource.body == b"from the mock"
    assert [r.headers.get("if-none-match") for r in seen] == [None, '"m"']


async def test_own_client_has_default_timeouts_and_is_closed_by_aclose(
    server: HttpTestServer,
) -> None:
    url = server.route("/c", Document(b"x"))
    poller = HttpPoller(url)
    await poller.poll()
    client = poller._http()
    assert client.timeout == DEFAULT_TIMEOUT
    timeouts = (client.timeout.connect, client.timeout.read, client.timeout.write)
    assert all(t is not None and 0 < t < math.inf for t in timeouts)
    assert client.timeout.pool is not None
    await poller.aclose()
    assert client.is_closed


async def test_own_client_follows_redirects(server: HttpTestServer) -> None:
    server.route("/new", Document(b"moved here"))

    def moved(exchange: Exchange) -> Reply:
        return Reply(301, headers={"Location": "/new"})

    url = server.route("/old", moved)
    async with HttpPoller(url) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == b"moved here"
    assert added.resource.url == url  # the resource is the watched URL


def test_name_defaults_to_the_url_and_can_be_set() -> None:
    url = "https://example.invalid/config.json"
    assert HttpPoller(url).name == url
    assert HttpPoller(url).with_name("config").name == "config"


@pytest.mark.parametrize("bad", ["", "example.com/x", "ftp://host/x", "http://", "/relative"])
def test_invalid_urls_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="absolute http"):
        HttpPoller(bad)


# -- state: changesets, checkpoints, restore -----------------------------------------------


async def test_changes_do_not_advance_the_state_until_commit(server: HttpTestServer) -> None:
    url = server.route("/c", Document(b"one", etag='"v1"'))
    async with HttpPoller(url) as poller:
        first = await poller.changes()
        assert [type(e) for e in first.events] == [Added]
        assert poller.state() == {}
        again = await poller.changes()  # not committed: the same change again
        assert again.events == first.events
        assert "if-none-match" not in server.requests_to("/c")[1].headers
        first.commit()
        assert poller.state() == {
            "digest": sha256(b"one"),
            "status": "200",
            "etag": '"v1"',
            "content_type": "application/json",
        }
        assert first.delta == {}  # a committed changeset is spent
        nothing = await poller.changes()
        assert nothing.events == []
        assert nothing.delta == {}


async def test_restored_state_keeps_the_validators(server: HttpTestServer) -> None:
    doc = Document(b"one", etag='"v1"', last_modified=DATE_1)
    url = server.route("/c", doc)
    async with HttpPoller(url) as first:
        (added,) = await first.poll()
        checkpoint = json.loads(json.dumps(dict(first.state())))  # as a store would keep it
    async with HttpPoller(url) as restored:
        restored.restore(checkpoint)
        assert dict(restored.state()) == checkpoint
        assert await restored.poll() == []  # no re-Added after a hand-over
        last = server.requests_to("/c")[-1]
        assert last.headers["if-none-match"] == '"v1"'
        assert last.status == 304
        doc.body, doc.etag = b"two", '"v2"'
        assert [type(e) for e in await restored.poll()] == [Modified]
    assert added.resource.digest == checkpoint["digest"]


async def test_removed_after_restore_carries_what_the_state_knew(server: HttpTestServer) -> None:
    doc = Document(b"one", etag='"v1"', last_modified=DATE_1)
    url = server.route("/c", doc)
    async with HttpPoller(url) as first:
        await first.poll()
        checkpoint = dict(first.state())
    doc.status = 404  # deleted while nobody was watching
    async with HttpPoller(url) as restored:
        restored.restore(checkpoint)
        (removed,) = await restored.poll()
    assert removed == Removed(
        HttpResource(
            url=url,
            status=200,
            body=b"",
            etag='"v1"',
            last_modified=DATE_1,
            content_type="application/json",
            digest=sha256(b"one"),
        )
    )
    assert removed.resource.version == f"sha256:{sha256(b'one')}"  # the same version as before


async def test_an_http_poller_under_watch_external(server: HttpTestServer) -> None:
    doc = Document(b"one", etag='"v1"')
    url = server.route("/c", doc)
    async with HttpPoller(url) as poller:
        events = watch_external(poller, 0.001)
        try:
            first = await anext(events)
            doc.body, doc.etag = b"two", '"v2"'
            second = await anext(events)
        finally:
            await events.aclose()
    assert isinstance(first, Added)
    assert second == Modified(HttpResource(url, 200, b"two", '"v2"', None, "application/json"))


# -- static servers that compute validators themselves -------------------------------------


async def test_static_server_with_last_modified_only(tmp_path: Path) -> None:
    served = tmp_path / "settings.json"
    served.write_bytes(b'{"v": 1}')
    mtime = served.stat().st_mtime
    with StaticFileServer(tmp_path) as static:
        url = static.url("/settings.json")
        async with HttpPoller(url) as poller:
            (added,) = await poller.poll()
            assert added.resource.etag is None
            assert added.resource.last_modified is not None
            assert await poller.poll() == []
            # Last-Modified has whole seconds: a change must move the mtime to a later second
            # for a Last-Modified-only server to see it (HTTP's limit, not the poller's).
            served.write_bytes(b'{"v": 2}')
            os.utime(served, (mtime + 10, mtime + 10))
            (modified,) = await poller.poll()
            assert modified == Modified(
                HttpResource(
                    url,
                    200,
                    b'{"v": 2}',
                    None,
                    modified.resource.last_modified,
                    "application/json",
                )
            )
            assert modified.resource.last_modified != added.resource.last_modified
            served.unlink()
            assert await poller.poll() == [Removed(modified.resource)]
    sent = [e.headers.get("if-modified-since") for e in static.exchanges]
    assert sent == [
        None,
        added.resource.last_modified,
        added.resource.last_modified,
        modified.resource.last_modified,
    ]
    assert [e.status for e in static.exchanges] == [200, 304, 200, 404]


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxServer]:
    server = containers.nginx_server(nginx_binary(), tmp_path / "nginx")
    if server is None:
        pytest.skip("nginx is not installed (Debian: apt-get install -y nginx-light)")
    with server as running:
        yield running


@pytest.mark.servers
async def test_nginx_etag_if_none_match_and_removal(nginx: NginxServer) -> None:
    served = nginx.root / "config.json"
    served.write_bytes(b'{"v": 1}')
    url = nginx.url("/config.json")
    async with HttpPoller(url) as poller:
        (added,) = await poller.poll()
        etag = added.resource.etag
        assert etag is not None
        assert etag.startswith('"')
        assert added.resource.last_modified is not None
        assert added.resource.content_type == "application/json"
        assert await poller.poll() == []
        served.write_bytes(b'{"v": 2, "more": true}')  # another size: another nginx ETag
        (modified,) = await poller.poll()
        assert modified.resource.body == b'{"v": 2, "more": true}'
        assert modified.resource.etag not in (None, etag)
        assert await poller.poll() == []
        served.unlink()
        assert await poller.poll() == [Removed(modified.resource)]
    logged = nginx.exchanges(5)
    assert [e.status for e in logged] == [200, 304, 200, 304, 404]
    assert [e.headers.get("if-none-match") for e in logged] == [
        None,
        etag,
        etag,
        modified.resource.etag,
        modified.resource.etag,
    ]
    # With an ETag known, If-Modified-Since is not sent.
    assert all("if-modified-since" not in e.headers for e in logged)
