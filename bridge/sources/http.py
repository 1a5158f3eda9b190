"""``HttpPoller``: watch one HTTP(S) URL for changes.

Conditional requests save bandwidth: ``If-None-Match`` when an ETag is known, else
``If-Modified-Since``; a 304 is no event. Whether content changed is decided by a SHA-256
digest of the body, so a server without validators (or one that changes its ETag without
changing the body) emits ``Modified`` only when the body really changed. The first 2xx emits
``Added``; 404/410 after a success emits ``Removed`` (before any success it is nothing). Any
other status, a transport error or a body over the cap is a poll error.

The body is the decoded representation: the poller asks for ``gzip, deflate`` and decodes them
itself, the cap bounding the decoded size at every step (:mod:`bridge.sources.http_body`).

Credentials, redirects and TLS: :mod:`bridge.sources.http_auth`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from bridge.errors import (
    BodyTooLargeError,
    HttpStatusError,
    SourceError,
    SourceUnavailableError,
    cause_chain,
)
from bridge.events import Added, EventData, ExternalEvent, Modified, Removed
from bridge.secrets import Secret, redact_url
from bridge.sources.base import (
    Changeset,
    Replay,
    StateDelta,
    StateMapSource,
    chain_event,
    replay_chain,
)
from bridge.sources.http_auth import (
    FORWARDABLE,
    SCHEMES,
    RedirectError,
    SecretValue,
    follow_redirect,
    origin,
    origin_of,
    tls_context,
)
from bridge.sources.http_body import ACCEPT_ENCODING, read_capped
from bridge.sources.http_clients import DEFAULT_TIMEOUT, HttpClients, SharedClient

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_REDIRECTS",
    "DEFAULT_TIMEOUT",
    "HttpClients",
    "HttpPoller",
    "HttpResource",
    "RedirectError",
    "SecretValue",
    "tls_context",
]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_DEADLINE_S = 30.0
"""The longest one poll's request may take, redirects and the whole body included (httpx's
timeouts bound each connect, read and write, so a server trickling bytes would never end)."""
DEFAULT_MAX_REDIRECTS = 5
_GONE = frozenset({404, 410})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DRAIN_LIMIT = 64 * 1024
"""Bodies of responses whose content is not used are read up to this size to keep the
connection; a larger one closes it."""


@dataclass(frozen=True, slots=True)
class HttpResource:
    """One response of the watched URL (for ``Removed``: the last one seen)."""

    url: str
    status: int
    body: bytes = field(repr=False)
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    digest: str = ""
    """Lowercase hex SHA-256 of ``body``; computed when not given."""

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.body).hexdigest())

    @property
    def key(self) -> str:
        return self.url

    @property
    def version(self) -> str:
        return f"sha256:{self.digest}"

    def event_data(self, max_inline_body_bytes: int) -> EventData:
        """The ``http-resource`` data of its events: the body inlined up to
        ``max_inline_body_bytes`` (UTF-8 text as is, anything else base64)."""
        body_known = bool(self.body) or self.digest == _EMPTY_DIGEST
        body: dict[str, str] | None = None
        if body_known and len(self.body) <= max_inline_body_bytes:
            try:
                body = {"encoding": "utf-8", "data": self.body.decode("utf-8")}
            except UnicodeDecodeError:
                body = {"encoding": "base64", "data": base64.b64encode(self.body).decode("ascii")}
        data = {
            "url": self.url,
            "status": self.status,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "content_type": self.content_type,
            "digest": self.version,
            "size": len(self.body) if body_known else None,
            "body": body,
        }
        return EventData(self.url, self.version, "http-resource", data, plain=True)


_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


class HttpPoller(StateMapSource):
    """Polls a single URL. Configure fluently: ``HttpPoller(url).with_bearer_token(t)``.

    Its client: one of a service's shared clients (``with_shared_client``, one per origin:
    :mod:`bridge.sources.http_clients`), the caller's own (``with_client``) or, with neither,
    one the poller makes itself (10 s timeouts, 5 s to connect) and closes in ``aclose()``.
    Whichever it is, the poller follows at most ``max_redirects`` redirects (default 5)
    itself, with the rules of :mod:`bridge.sources.http_auth`.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.netloc:
            raise ValueError(
                f"HttpPoller needs an absolute http:// or https:// URL, not {redact_url(url)!r}"
            )
        self.url = url
        self._origin = origin(httpx.URL(url))
        self._name = url
        self._headers: dict[str, tuple[str, SecretValue]] = {}
        self._authorization: tuple[str, Callable[[], str]] | None = None
        self._server_name: str | None = None
        self._client: httpx.AsyncClient | None = None
        self._owns_client = False
        self._shared: SharedClient | None = None
        self._timeout: httpx.Timeout | None = None
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES
        self.max_redirects = DEFAULT_MAX_REDIRECTS
        self.deadline_s = DEFAULT_DEADLINE_S
        self._state: dict[str, str] = {}
        self._last: HttpResource | None = None
        self._url_cache: tuple[str, httpx.URL] | None = None

    # -- fluent configuration ---------------------------------------------------------------

    def with_name(self, name: str) -> Self:
        self._name = name
        return self

    def with_bearer_token(self, token: SecretValue) -> Self:
        """Send ``Authorization: Bearer <token>`` (to the watched URL's origin only).

        A :class:`Secret` or a function is asked for the token on every request.
        """

        def header() -> str:
            return f"Bearer {self._reveal('the bearer token', token)}"

        self._authorization = ("the bearer token", header)
        return self

    def with_basic_auth(self, username: str, password: SecretValue) -> Self:
        """Send ``Authorization: Basic`` (to the watched URL's origin only).

        A :class:`Secret` or a function is asked for the password on every request.
        """
        if ":" in username:
            raise ValueError("a basic auth username must not contain ':'")

        def header() -> str:
            secret = self._reveal("the basic auth password", password)
            return "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode("ascii")

        self._authorization = ("the basic auth password", header)
        return self

    def with_header(self, name: str, value: SecretValue) -> Self:
        """Send this header on every request to the watched URL's origin.

        After a redirect to another origin only content-negotiation headers (``Accept*``,
        ``User-Agent``, ``Cache-Control``, ``Pragma``) are sent on. A :class:`Secret` or a
        function is asked for the value on every request.
        """
        self._headers[name] = (f"header {name}", value)
        return self

    def with_server_name(self, server_name: str) -> Self:
        """Expect this host name in the server's certificate (and send it as SNI) instead of
        the URL's host; for the watched URL's origin only."""
        self._server_name = server_name
        return self

    def with_max_redirects(self, count: int) -> Self:
        """Follow at most ``count`` redirects (0: a redirect is an error)."""
        if count < 0:
            raise ValueError(f"max_redirects must be >= 0, got {count!r}")
        self.max_redirects = count
        return self

    def with_client(self, client: httpx.AsyncClient, *, owned: bool = False) -> Self:
        """Use this client (custom CA, mTLS, proxies, timeouts).

        The caller closes it, unless ``owned`` hands it to the poller's ``aclose()``. The
        client's ``follow_redirects`` is ignored: the poller follows redirects itself.
        """
        if self._shared is not None:
            raise RuntimeError(f"{self._where}: the poller has a shared client already")
        self._client, self._owns_client = client, owned
        return self

    def with_shared_client(self, shared: SharedClient) -> Self:
        """Poll with a client shared with the other sources to the same origin (see
        :meth:`HttpClients.lease`); ``aclose()`` releases it, the last source closing it."""
        if self._client is not None:
            raise RuntimeError(f"{self._where}: the poller has a client already")
        self._shared = shared
        return self

    def with_timeout(self, seconds: float, *, connect_s: float | None = None) -> Self:
        """Wait at most ``seconds`` for each read and write of a request, ``connect_s``
        (default: ``seconds``) to connect, whatever the client's own timeouts."""
        if not seconds > 0 or (connect_s is not None and not connect_s > 0):
            raise ValueError(f"timeouts must be > 0, got {seconds!r} and {connect_s!r}")
        self._timeout = httpx.Timeout(seconds, connect=connect_s)
        return self

    def with_deadline(self, seconds: float) -> Self:
        """Fail a poll whose request has not completed (to its last byte) within ``seconds``."""
        if not seconds > 0:
            raise ValueError(f"deadline must be > 0, got {seconds!r}")
        self.deadline_s = seconds
        return self

    def with_max_body_bytes(self, cap: int) -> Self:
        if cap <= 0:
            raise ValueError(f"max_body_bytes must be > 0, got {cap!r}")
        self.max_body_bytes = cap
        return self

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    async def aclose(self) -> None:
        """Close the client if the poller created it (or was handed it); release a shared
        one."""
        if self._shared is not None:
            shared, self._shared = self._shared, None
            await shared.release()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._shared is not None:
            return self._shared.client
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, follow_redirects=False)
            self._owns_client = True
        return self._client

    # -- polling ----------------------------------------------------------------------------

    def restore(self, state: Any) -> None:
        super().restore(state)
        self._last = None

    def state_from_published(self, items: Mapping[str, str]) -> Mapping[str, str]:
        """The body digest of the URL's last event (its version token is ``sha256:<digest>``).
        The validators are learnt again by the first poll, an unconditional GET."""
        version = items.get(self.url)
        if version is None:
            return {}
        digest = version.removeprefix("sha256:")
        if len(digest) != 64:  # unknown (bridge.state.recovery): matches no body, schema-valid
            digest = "0" * 64
        return {"digest": digest, "status": "200"}

    async def changes(self, replay: Replay | None = None) -> Changeset:
        try:
            async with asyncio.timeout(self.deadline_s):
                resource = await self._fetch(conditional=replay is None)
        except TimeoutError as exc:
            raise SourceUnavailableError(
                f"{self._where} failed: timed out: no complete response within "
                f"{self.deadline_s:g} s"
            ) from exc
        if replay is not None:
            return self._replayed(resource, replay)
        state = self._state
        present = "digest" in state
        events: list[ExternalEvent[HttpResource]] = []
        delta: StateDelta = {}
        if resource is None:  # 304 Not Modified
            return Changeset([], {}, state)
        if resource.status in _GONE:
            if present:
                events.append(Removed(self._last or self._from_state()))
                delta = dict.fromkeys(state)
            return Changeset(events, delta, state, self._forget)
        new_state = _state_of(resource)
        delta = {k: v for k, v in new_state.items() if state.get(k) != v}
        delta.update({k: None for k in state if k not in new_state})
        if not present:
            events.append(Added(resource))
        elif state["digest"] != resource.digest:
            events.append(Modified(resource))
        return Changeset(events, delta, state, lambda: self._remember(resource))

    def _replayed(self, resource: HttpResource | None, replay: Replay) -> Changeset:
        """The changes after a recorded intent (see Replay): the intent's event again (and the
        events before it in its batch), then the change since, if any (see replay_chain); the
        delta relative to ``replay.before``."""
        assert resource is not None  # an unconditional GET never gets 304
        state, before = self._state, replay.before
        stale = set(before) | set(state)
        gone = resource.status in _GONE
        was = _version_of(before) or replay.removed.get(self.url)
        intent = _version_of(state)  # the state was restored with the intent's delta
        current = None if gone else resource.version
        events: list[ExternalEvent[HttpResource]] = []
        for kind, version in replay_chain(was, intent, replay.lead.get(self.url, ()), current):
            if version == current:
                known = resource
            elif version == intent:
                known = self._from_state()
            elif version == _version_of(before):
                known = self._from_state(before)
            else:  # an earlier intent's version: no validators, no body
                known = HttpResource(self.url, 200, b"", digest=version.removeprefix("sha256:"))
            events.append(chain_event(kind, known))
        if gone:
            return Changeset(events, dict.fromkeys(stale), state, self._forget)
        new_state = _state_of(resource)
        delta: StateDelta = {k: v for k, v in new_state.items() if before.get(k) != v}
        delta.update({k: None for k in stale if k not in new_state})
        return Changeset(events, delta, state, lambda: self._remember(resource))

    def _remember(self, resource: HttpResource) -> None:
        self._last = resource

    def _forget(self) -> None:
        self._last = None

    def _from_state(self, state: Mapping[str, str] | None = None) -> HttpResource:
        """The last resource as far as the state knows it (after a restore: no body)."""
        s = self._state if state is None else state
        return HttpResource(
            url=self.url,
            status=int(s.get("status", "200")),
            body=b"",
            etag=s.get("etag"),
            last_modified=s.get("last_modified"),
            content_type=s.get("content_type"),
            digest=s["digest"],
        )

    @property
    def _where(self) -> str:
        """``GET <url>`` for messages, prefixed by the source's name when it has one."""
        get = f"GET {redact_url(self.url)}"
        return get if self._name == self.url else f"source {self._name!r}: {get}"

    def _named(self, error: SourceError) -> SourceError:
        """``error`` with the source's name in front of its message (when it has a name)."""
        if self._name != self.url:
            error.args = (f"source {self._name!r}: {error}", *error.args[1:])
        return error

    def _parsed_url(self) -> httpx.URL:
        """``self.url`` parsed, once per value (parsing costs more than a 304 poll's diff)."""
        parsed = self._url_cache
        if parsed is None or parsed[0] != self.url:
            parsed = self._url_cache = (self.url, httpx.URL(self.url))
        return parsed[1]

    async def _fetch(self, *, conditional: bool = True) -> HttpResource | None:
        """GET the URL; None for 304; a resource with an empty body for 404/410."""
        validators: dict[str, str] = {}
        if conditional and "digest" in self._state:
            if etag := self._state.get("etag"):
                validators["If-None-Match"] = etag
            elif last_modified := self._state.get("last_modified"):
                validators["If-Modified-Since"] = last_modified
        url = self._parsed_url()
        visited = [url]
        try:
            while True:
                response = await self._send(url, validators)
                try:
                    status = response.status_code
                    if status in _REDIRECTS and "location" in response.headers:
                        await _drain(response)
                        url = follow_redirect(
                            url,
                            response,
                            visited,
                            max_redirects=self.max_redirects,
                            where=self._where,
                        )
                        visited.append(url)
                        continue
                    return await self._resource(response, conditional=conditional)
                finally:
                    await response.aclose()
        except httpx.TransportError as exc:
            raise SourceUnavailableError(f"{self._where} failed: {_describe(exc, url)}") from exc
        except httpx.HTTPError as exc:
            raise SourceError(f"{self._where} failed: {_describe(exc, url)}") from exc
        except ssl.SSLError as exc:  # httpcore lets a TLS alert read after the handshake through
            raise SourceUnavailableError(f"{self._where} failed: {_describe(exc, url)}") from exc

    async def _send(self, url: httpx.URL, conditional: dict[str, str]) -> httpx.Response:
        """One request, no redirects followed; credentials only to the watched origin."""
        client = self._http()
        if origin(url) == self._origin:
            headers = {
                name: self._reveal(what, value) for name, (what, value) in self._headers.items()
            }
            _accept_encoding(headers)
            if self._authorization is not None:
                headers["Authorization"] = self._authorization[1]()
            headers.update(conditional)
            extensions = {"sni_hostname": self._server_name} if self._server_name else None
            request = client.build_request(
                "GET", url, headers=headers, extensions=extensions, timeout=self._request_timeout
            )
            return await client.send(request, stream=True, follow_redirects=False)
        headers = {
            name: self._reveal(what, value)
            for name, (what, value) in self._headers.items()
            if name.lower() in FORWARDABLE
        }
        _accept_encoding(headers)
        headers.update(conditional)
        request = client.build_request("GET", url, headers=headers, timeout=self._request_timeout)
        for name in [n for n in request.headers if n.lower() not in FORWARDABLE]:
            del request.headers[name]  # the client's own headers (and cookies) stay home too
        return await client.send(request, stream=True, follow_redirects=False, auth=None)

    @property
    def _request_timeout(self) -> httpx.Timeout | httpx._client.UseClientDefault:
        return self._timeout if self._timeout is not None else httpx.USE_CLIENT_DEFAULT

    async def _resource(
        self, response: httpx.Response, *, conditional: bool
    ) -> HttpResource | None:
        status = response.status_code
        if status == 304 and conditional and "digest" in self._state:
            await _drain(response)
            return None
        if status in _GONE:
            await _drain(response)
            return HttpResource(self.url, status, b"")
        if not 200 <= status < 300:
            raise self._named(HttpStatusError(redact_url(self.url), status))
        try:
            body, digest = await read_capped(
                response, cap=self.max_body_bytes, url=redact_url(self.url)
            )
        except BodyTooLargeError as exc:
            raise self._named(exc) from None
        return HttpResource(
            url=self.url,
            status=status,
            body=body,
            etag=response.headers.get("etag"),
            last_modified=response.headers.get("last-modified"),
            content_type=response.headers.get("content-type"),
            digest=digest,
        )

    def _reveal(self, what: str, value: SecretValue) -> str:
        """The current value of a credential; a clear error (never the value) if unusable."""
        try:
            if isinstance(value, str):
                current = value
            elif isinstance(value, Secret):
                current = value.reveal()
            else:
                current = value()
        except OSError as exc:
            raise SourceError(
                f"{self._where}: cannot read {what} ({origin_of(value)}): "
                f"{exc.strerror or type(exc).__name__}"
            ) from exc
        except Exception as exc:
            raise SourceError(
                f"{self._where}: cannot get {what} ({origin_of(value)}): {type(exc).__name__}"
            ) from exc
        if not current and not isinstance(value, str):  # e.g. a file truncated mid-write
            raise SourceError(f"{self._where}: {what} ({origin_of(value)}) is empty")
        if any(c in current for c in "\r\n\0"):
            raise SourceError(
                f"{self._where}: {what} ({origin_of(value)}) contains a line break or NUL"
            )
        return current


def _accept_encoding(headers: dict[str, str]) -> None:
    """Ask for the codings the poller decodes under its cap (whatever the client's default),
    unless the user set ``Accept-Encoding`` with ``with_header``."""
    if not any(name.lower() == "accept-encoding" for name in headers):
        headers["Accept-Encoding"] = ACCEPT_ENCODING


async def _drain(response: httpx.Response) -> None:
    """Read a body nobody needs (a 304, 404, redirect), so that closing the response returns
    its connection to the pool instead of closing it; a large one is left unread (closed)."""
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > _DRAIN_LIMIT:
            return


def _version_of(state: Mapping[str, str]) -> str | None:
    """The version of the document a state describes (None: absent)."""
    digest = state.get("digest")
    return None if digest is None else f"sha256:{digest}"


def _state_of(resource: HttpResource) -> dict[str, str]:
    state = {"digest": resource.digest, "status": str(resource.status)}
    if resource.etag:
        state["etag"] = resource.etag
    if resource.last_modified:
        state["last_modified"] = resource.last_modified
    if resource.content_type:
        state["content_type"] = resource.content_type
    return state


def _describe(exc: httpx.HTTPError | ssl.SSLError, url: httpx.URL) -> str:
    """The error, with its root cause when that says more (httpx's ReadError says nothing)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    root = cause_chain(exc, limit=11)[-1]
    if root is not exc and str(root) and str(root) not in text:
        text += f" ({type(root).__name__}: {root})"
    dropped = isinstance(root, ConnectionResetError | BrokenPipeError)
    if url.scheme == "https" and (dropped or "CERTIFICATE_REQUIRED" in text):
        text += (
            "; if the server requires a client certificate, give one "
            "(tls.cert_file and tls.key_file, or a client with one)"
        )
    return text
