"""HTTP sources: credentials from files (re-read when rotated), basic auth, mutual TLS, and the
redirect rules (credentials never leave the watched origin; no https -> http; only http(s);
loops and limits are clear errors).

Real servers on 127.0.0.1 (:class:`~tests.support.httpserver.HttpTestServer`, HTTPS through an
``ssl.SSLContext`` with certificates from ``trustme``); "another host" is another port, which is
another origin. Pollers are built from config documents by ``build_source``, as the service
builds them, unless a test is about the library API.
"""

from __future__ import annotations

import base64
import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from bridge import Added, HttpPoller, HttpStatusError, SourceError, SourceUnavailableError
from bridge.errors import ConfigError
from bridge.secrets import Secret
from bridge.service.config import SourceConfig, parse_config
from bridge.service.runner import build_source
from bridge.sources.http import RedirectError
from tests.support.httpserver import Document, Exchange, HttpTestServer, Reply

SOURCE = "app-config"
TOKEN_1 = "token-one-8f1d2c"
TOKEN_2 = "token-two-77ab09"
API_KEY = "api-key-5e5e5e"


# -- helpers -------------------------------------------------------------------------------


def source_config(http: dict[str, Any]) -> SourceConfig:
    doc = {
        "broker": {"url": "nats://127.0.0.1:4222"},
        "sources": [{"name": SOURCE, "interval": "1s", "http": http}],
    }
    (source,) = parse_config(doc).sources
    return source


def build_poller(http: dict[str, Any]) -> HttpPoller:
    poller = build_source(source_config(http)).source
    assert isinstance(poller, HttpPoller)
    return poller


def write_old(path: Path, text: str) -> None:
    """Write ``text`` with an mtime an hour ago: the file was provisioned a while back."""
    path.write_text(text + "\n")
    past = time.time() - 3600
    os.utime(path, (past, past))


def assert_no_secret(message: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in message


def authorization(exchange: Exchange) -> str | None:
    return exchange.headers.get("authorization")


@pytest.fixture
def server() -> Iterator[HttpTestServer]:
    with HttpTestServer() as running:
        yield running


@pytest.fixture
def other() -> Iterator[HttpTestServer]:
    """Another origin: the same address, another port."""
    with HttpTestServer() as running:
        yield running


def redirect(
    to: str, status: int = 302, headers: dict[str, str] | None = None
) -> Callable[[Exchange], Reply]:
    def respond(exchange: Exchange) -> Reply:
        return Reply(status, headers={"Location": to, **(headers or {})})

    return respond


# -- rotated credentials -------------------------------------------------------------------


async def test_a_rotated_token_file_is_used_from_the_next_poll(
    server: HttpTestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    write_old(token_file, TOKEN_1)
    doc = Document(b"v1", etag='"1"')
    url = server.route("/config", doc)
    async with build_poller({"url": url, "bearer_token": {"file": str(token_file)}}) as poller:
        assert [type(e) for e in await poller.poll()] == [Added]
        token_file.write_text(TOKEN_2 + "\n")  # rotated in place, mid-run
        assert await poller.poll() == []
        assert await poller.poll() == []
    assert [authorization(e) for e in server.requests_to("/config")] == [
        f"Bearer {TOKEN_1}",
        f"Bearer {TOKEN_2}",
        f"Bearer {TOKEN_2}",
    ]


async def test_a_kubernetes_style_token_swap_is_used_from_the_next_poll(
    server: HttpTestServer, tmp_path: Path
) -> None:
    """Projected volumes swap a ``..data`` symlink to a new directory; the token path is a
    symlink through it, so the file behind the path changes without being written."""
    volume = tmp_path / "serviceaccount"
    volume.mkdir()
    first, second = volume / "..2024_01_01", volume / "..2024_01_02"
    first.mkdir()
    second.mkdir()
    write_old(first / "token", TOKEN_1)
    (second / "token").write_text(TOKEN_2)
    (volume / "..data").symlink_to(first.name)
    (volume / "token").symlink_to("..data/token")
    url = server.route("/config", Document(b"v1", etag='"1"'))
    http = {"url": url, "bearer_token": {"file": str(volume / "token")}}
    async with build_poller(http) as poller:
        await poller.poll()
        staged = volume / "..data_tmp"
        staged.symlink_to(second.name)
        staged.replace(volume / "..data")  # atomic, as kubelet's AtomicWriter does
        await poller.poll()
    assert [authorization(e) for e in server.requests_to("/config")] == [
        f"Bearer {TOKEN_1}",
        f"Bearer {TOKEN_2}",
    ]


async def test_secret_headers_are_read_again_for_every_request(
    server: HttpTestServer, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    write_old(key_file, "key-1")
    url = server.route("/config", Document(b"v1"))
    http = {"url": url, "headers": {"X-Api-Key": {"file": str(key_file)}, "Accept": "text/plain"}}
    async with build_poller(http) as poller:
        await poller.poll()
        key_file.write_text("key-2")
        await poller.poll()
    requests = server.requests_to("/config")
    assert [e.headers["x-api-key"] for e in requests] == ["key-1", "key-2"]
    assert [e.headers["accept"] for e in requests] == ["text/plain", "text/plain"]


async def test_a_missing_token_file_is_a_clear_error_until_it_is_back(
    server: HttpTestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    write_old(token_file, TOKEN_1)
    url = server.route("/config", Document(b"v1"))
    async with build_poller({"url": url, "bearer_token": {"file": str(token_file)}}) as poller:
        token_file.unlink()
        with pytest.raises(SourceError) as caught:
            await poller.poll()
        token_file.write_text(TOKEN_2)
        assert [type(e) for e in await poller.poll()] == [Added]
    message = str(caught.value)
    assert f"source {SOURCE!r}" in message
    assert url in message
    assert f"file:{token_file}" in message
    assert "No such file" in message
    assert server.requests_to("/config")[-1].headers["authorization"] == f"Bearer {TOKEN_2}"
    assert len(server.requests_to("/config")) == 1  # nothing was sent without the token


@pytest.mark.parametrize("content", ["", "\n", "two\nlines"])
async def test_an_empty_or_multiline_token_is_refused_without_showing_it(
    server: HttpTestServer, tmp_path: Path, content: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(content)
    url = server.route("/config", Document(b"v1"))
    async with build_poller({"url": url, "bearer_token": {"file": str(token_file)}}) as poller:
        with pytest.raises(SourceError, match="bearer token") as caught:
            await poller.poll()
    assert f"file:{token_file}" in str(caught.value)
    assert_no_secret(str(caught.value), "two", "lines")
    assert server.requests_to("/config") == []


async def test_a_token_function_is_called_for_every_request(server: HttpTestServer) -> None:
    tokens = iter(["t1", "t2"])
    url = server.route("/config", Document(b"v1"))
    async with HttpPoller(url).with_bearer_token(lambda: next(tokens)) as poller:
        await poller.poll()
        await poller.poll()
    assert [authorization(e) for e in server.requests_to("/config")] == ["Bearer t1", "Bearer t2"]


# -- basic auth ----------------------------------------------------------------------------


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass
class Guarded:
    """A document that only answers a request with the expected Authorization header."""

    expected: str
    doc: Document

    def __call__(self, exchange: Exchange) -> Reply:
        if exchange.headers.get("authorization") != self.expected:
            return Reply(401, b"who are you?", {"WWW-Authenticate": 'Basic realm="x"'})
        return self.doc(exchange)


async def test_basic_auth_is_accepted_and_a_rotated_password_is_used(
    server: HttpTestServer, tmp_path: Path
) -> None:
    password_file = tmp_path / "password"
    write_old(password_file, "pässword-1")
    guarded = Guarded(basic("bridge", "pässword-1"), Document(b"secret data", etag='"1"'))
    url = server.route("/config", guarded)
    http = {
        "url": url,
        "basic_auth": {"username": "bridge", "password": {"file": str(password_file)}},
    }
    async with build_poller(http) as poller:
        (added,) = await poller.poll()
        assert added.resource.body == b"secret data"
        guarded.expected = basic("bridge", "password-2")  # the server rotates first...
        with pytest.raises(HttpStatusError) as caught:
            await poller.poll()
        password_file.write_text("password-2")  # ...then the mounted secret follows
        assert await poller.poll() == []
    assert caught.value.status == 401
    assert f"source {SOURCE!r}" in str(caught.value)
    assert_no_secret(str(caught.value), "pässword-1", "password-2")
    assert [e.status for e in server.requests_to("/config")] == [200, 401, 304]


# -- mutual TLS ----------------------------------------------------------------------------


@dataclass
class Pki:
    server_ca: trustme.CA
    client_ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self, *hostnames: str, client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ca.issue_cert(*(hostnames or ("127.0.0.1",))).configure_cert(context)
        if client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            self.client_ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    client = client_ca.issue_cert("koprs-bridge.test")
    pki = Pki(server_ca, client_ca, folder / "ca.pem", folder / "client.pem", folder / "client.key")
    server_ca.cert_pem.write_to_path(str(pki.ca_file))
    client.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    client.private_key_pem.write_to_path(str(pki.key_file))
    return pki


async def test_mutual_tls_with_a_client_certificate(pki: Pki) -> None:
    with HttpTestServer(tls=pki.server_context()) as tls_server:
        url = tls_server.route("/config", Document(b"over mTLS"))
        tls = {"ca_file": str(pki.ca_file), "cert_file": str(pki.cert_file)}
        tls["key_file"] = str(pki.key_file)
        async with build_poller({"url": url, "tls": tls}) as poller:
            (added,) = await poller.poll()
    assert url.startswith("https://127.0.0.1:")
    assert added.resource.body == b"over mTLS"


async def test_mutual_tls_without_a_client_certificate_is_a_clear_error(pki: Pki) -> None:
    with HttpTestServer(tls=pki.server_context()) as tls_server:
        url = tls_server.route("/config", Document(b"over mTLS"))
        async with build_poller({"url": url, "tls": {"ca_file": str(pki.ca_file)}}) as poller:
            with pytest.raises(SourceUnavailableError) as caught:
                await poller.poll()
        assert tls_server.requests_to("/config") == []
    message = str(caught.value)
    assert f"source {SOURCE!r}" in message
    assert url in message
    assert "certificate" in message.lower()


async def test_an_unknown_server_ca_is_a_clear_error(pki: Pki) -> None:
    with HttpTestServer(tls=pki.server_context(client_cert=False)) as tls_server:
        url = tls_server.route("/config", Document(b"x"))
        async with build_poller({"url": url}) as poller:  # the default CAs do not know it
            with pytest.raises(SourceUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                await poller.poll()
        async with build_poller({"url": url, "verify_tls": str(pki.ca_file)}) as poller:
            assert [type(e) for e in await poller.poll()] == [Added]  # the short form


async def test_server_name_checks_the_certificate_for_another_name(pki: Pki) -> None:
    server_tls = pki.server_context("config.internal.test", client_cert=False)
    with HttpTestServer(tls=server_tls) as tls_server:
        url = tls_server.route("/config", Document(b"x"))
        tls: dict[str, Any] = {"ca_file": str(pki.ca_file)}
        async with build_poller({"url": url, "tls": tls}) as poller:
            with pytest.raises(SourceUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
                await poller.poll()  # the certificate is not for 127.0.0.1
        tls["server_name"] = "config.internal.test"
        async with build_poller({"url": url, "tls": tls}) as poller:
            assert [type(e) for e in await poller.poll()] == [Added]


def test_an_unusable_client_key_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    tls = {"ca_file": str(pki.ca_file), "cert_file": str(pki.cert_file), "key_file": str(bad_key)}
    with pytest.raises(ConfigError, match=f"source {SOURCE!r}: cannot load the TLS certificates"):
        build_poller({"url": "https://127.0.0.1:1/x", "tls": tls})


# -- redirects: where credentials go -------------------------------------------------------


def credentialed(url: str, token_file: Path) -> dict[str, Any]:
    return {
        "url": url,
        "bearer_token": {"file": str(token_file)},
        "headers": {"X-Api-Key": API_KEY, "Accept": "application/json"},
    }


async def test_a_cross_origin_redirect_gets_no_credentials(
    server: HttpTestServer, other: HttpTestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    landing = other.route("/landing", Document(b"elsewhere"))
    # The origin also sets a cookie: a jar matches cookies by host, not port, so without the
    # poller's rule it would go along to 127.0.0.1:<other port>.
    url = server.route(
        "/start", redirect(landing, headers={"Set-Cookie": "session=c00kie; Path=/"})
    )
    async with build_poller(credentialed(url, token_file)) as poller:
        (added,) = await poller.poll()
        await poller.poll()
    assert added.resource.body == b"elsewhere"
    assert added.resource.url == url
    for sent in server.requests_to("/start"):
        assert sent.headers["authorization"] == f"Bearer {TOKEN_1}"
        assert sent.headers["x-api-key"] == API_KEY
    received = other.requests_to("/landing")
    assert len(received) == 2
    for sent in received:
        assert "authorization" not in sent.headers
        assert "x-api-key" not in sent.headers
        assert "cookie" not in sent.headers
        assert sent.headers["accept"] == "application/json"  # harmless headers go on
        assert_no_secret(str(sent.headers), TOKEN_1, API_KEY, "c00kie")


async def test_a_clients_own_credentials_do_not_follow_a_cross_origin_redirect(
    server: HttpTestServer, other: HttpTestServer
) -> None:
    """Even a client configured to follow redirects, with its own auth and headers."""
    landing = other.route("/landing", Document(b"elsewhere"))
    url = server.route("/start", redirect(landing, 307))
    client = httpx.AsyncClient(
        follow_redirects=True, auth=("user", "pw-123"), headers={"X-Client-Secret": "cs-456"}
    )
    async with client, HttpPoller(url).with_client(client) as poller:
        await poller.poll()
    (at_origin,) = server.requests_to("/start")
    assert at_origin.headers["authorization"] == basic("user", "pw-123")
    assert at_origin.headers["x-client-secret"] == "cs-456"
    (elsewhere,) = other.requests_to("/landing")
    assert "authorization" not in elsewhere.headers
    assert "x-client-secret" not in elsewhere.headers


async def test_a_same_origin_redirect_keeps_the_credentials(
    server: HttpTestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    server.route("/new", Document(b"moved"))
    server.route("/old", redirect("/new", 301))
    url = server.url("/start")
    server.route("/start", redirect(server.url("/old"), 308))  # absolute, same origin
    async with build_poller(credentialed(url, token_file)) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == b"moved"
    for path in ("/start", "/old", "/new"):
        (sent,) = server.requests_to(path)
        assert sent.headers["authorization"] == f"Bearer {TOKEN_1}"
        assert sent.headers["x-api-key"] == API_KEY


async def test_credentials_return_when_a_redirect_comes_back_to_the_origin(
    server: HttpTestServer, other: HttpTestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    server.route("/final", Document(b"home again"))
    other.route("/bounce", redirect(server.url("/final")))
    url = server.route("/start", redirect(other.url("/bounce")))
    async with build_poller(credentialed(url, token_file)) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == b"home again"
    (bounced,) = other.requests_to("/bounce")
    assert "authorization" not in bounced.headers
    (final,) = server.requests_to("/final")
    assert final.headers["authorization"] == f"Bearer {TOKEN_1}"


# -- redirects: refused --------------------------------------------------------------------


async def test_a_redirect_from_https_to_http_is_refused(
    pki: Pki, other: HttpTestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    plain = other.route("/plain", Document(b"unencrypted"))
    with HttpTestServer(tls=pki.server_context(client_cert=False)) as tls_server:
        url = tls_server.route("/config", redirect(plain))
        http = {**credentialed(url, token_file), "verify_tls": str(pki.ca_file)}
        async with build_poller(http) as poller:
            with pytest.raises(RedirectError) as caught:
                await poller.poll()
    message = str(caught.value)
    assert f"source {SOURCE!r}" in message
    assert url in message
    assert plain in message
    assert "https" in message
    assert "unencrypted http" in message
    assert other.requests_to("/plain") == []
    assert_no_secret(message, TOKEN_1, API_KEY)


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://127.0.0.1/config", "gopher://127.0.0.1:70/x"]
)
async def test_a_redirect_to_another_scheme_is_refused(
    server: HttpTestServer, tmp_path: Path, location: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    url = server.route("/config", redirect(location))
    async with build_poller(credentialed(url, token_file)) as poller:
        with pytest.raises(RedirectError) as caught:
            await poller.poll()
    message = str(caught.value)
    assert f"source {SOURCE!r}" in message
    assert url in message
    assert location in message
    assert "only http:// and https://" in message
    assert not isinstance(caught.value, SourceUnavailableError)


async def test_a_redirect_loop_is_a_clear_error_with_redacted_urls(
    server: HttpTestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_1)
    server.route("/a", redirect("/b?token=hunter2"))
    server.route("/b", redirect("/a?token=hunter2"))
    url = server.url("/a?token=hunter2")
    async with build_poller(credentialed(url, token_file)) as poller:
        with pytest.raises(RedirectError) as caught:
            await poller.poll()
    message = str(caught.value)
    assert "redirect loop" in message
    assert f"source {SOURCE!r}" in message
    assert f"{server.url('/a')} -> {server.url('/b')} -> {server.url('/a')}" in message
    assert_no_secret(message, "hunter2", TOKEN_1, API_KEY)
    assert len(server.exchanges) == 2


async def test_max_redirects_zero_makes_any_redirect_an_error(server: HttpTestServer) -> None:
    server.route("/new", Document(b"moved"))
    url = server.route("/old", redirect("/new", 301))
    async with build_poller({"url": url, "max_redirects": 0}) as poller:
        with pytest.raises(RedirectError) as caught:
            await poller.poll()
    message = str(caught.value)
    assert f"source {SOURCE!r}" in message
    assert "HTTP 301" in message
    assert server.url("/new") in message
    assert "redirects are disabled (max_redirects: 0)" in message
    assert server.requests_to("/new") == []


async def test_more_redirects_than_max_redirects_is_an_error(server: HttpTestServer) -> None:
    for hop in range(4):
        server.route(f"/{hop}", redirect(f"/{hop + 1}"))
    server.route("/4", Document(b"the end"))
    async with build_poller({"url": server.url("/0"), "max_redirects": 3}) as poller:
        with pytest.raises(RedirectError, match=r"more than 3 redirects") as caught:
            await poller.poll()
    assert server.requests_to("/4") == []
    assert server.url("/3") in str(caught.value)
    async with build_poller({"url": server.url("/0"), "max_redirects": 4}) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == b"the end"


def test_the_library_api_validates_its_arguments() -> None:
    poller = HttpPoller("http://127.0.0.1/x")
    with pytest.raises(ValueError, match="max_redirects"):
        poller.with_max_redirects(-1)
    with pytest.raises(ValueError, match="':'"):
        poller.with_basic_auth("a:b", "pw")
    assert poller.with_max_redirects(0).max_redirects == 0
    secret = Secret.inline("s3cr3t")
    assert "s3cr3t" not in repr(poller.with_bearer_token(secret).__dict__)
