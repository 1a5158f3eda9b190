"""``HttpPoller``: watch one HTTP(S) URL for changes.

Conditional requests save bandwidth: ``If-None-Match`` when an ETag is known, else
``If-Modified-Since``; a 304 is no event. Whether content changed is decided by a SHA-256
digest of the body, so a server without validators (or one that changes its ETag without
changing the body) emits ``Modified`` only when the body really changed. The first 2xx emits
``Added``; 404/410 after a success emits ``Removed`` (before any success it is nothing). Any
other status, a transport error or a body over the cap is a poll error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from bridge.errors import (
    BodyTooLargeError,
    HttpStatusError,
    SourceError,
    SourceUnavailableError,
)
from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.sources.base import Changeset, Replay, StateDelta, StateMapSource

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_TIMEOUT", "HttpPoller", "HttpResource"]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
DEFAULT_MAX_REDIRECTS = 5
_GONE = frozenset({404, 410})


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


class HttpPoller(StateMapSource):
    """Polls a single URL. Configure fluently: ``HttpPoller(url).with_bearer_token(t)``.

    Without ``with_client`` the poller makes its own ``httpx.AsyncClient`` (10 s timeouts,
    5 s to connect, at most 5 redirects) and closes it in ``aclose()``.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"HttpPoller needs an absolute http:// or https:// URL, not {url!r}")
        self.url = url
        self._name = url
        self._headers: dict[str, str] = {}
        self._client: httpx.AsyncClient | None = None
        self._owns_client = False
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES
        self._state: dict[str, str] = {}
        self._last: HttpResource | None = None

    # -- fluent configuration ---------------------------------------------------------------

    def with_name(self, name: str) -> Self:
        self._name = name
        return self

    def with_bearer_token(self, token: str) -> Self:
        return self.with_header("Authorization", f"Bearer {token}")

    def with_header(self, name: str, value: str) -> Self:
        self._headers[name] = value
        return self

    def with_client(self, client: httpx.AsyncClient, *, owned: bool = False) -> Self:
        """Use this client (custom CA, mTLS, proxies, timeouts).

        The caller closes it, unless ``owned`` hands it to the poller's ``aclose()``.
        """
        self._client, self._owns_client = client, owned
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
        """Close the client if the poller created it."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=DEFAULT_TIMEOUT, follow_redirects=True, max_redirects=DEFAULT_MAX_REDIRECTS
            )
            self._owns_client = True
        return self._client

    # -- polling ----------------------------------------------------------------------------

    def restore(self, state: Any) -> None:
        super().restore(state)
        self._last = None

    async def changes(self, replay: Replay | None = None) -> Changeset:
        resource = await self._fetch(conditional=replay is None)
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
        """The changes after a recorded intent (see Replay): diffed against the restored state,
        or the intent's own event again, relative to ``replay.before``, if nothing changed."""
        assert resource is not None  # an unconditional GET never gets 304
        state, before = self._state, replay.before
        stale = set(before) | set(state)
        if resource.status in _GONE:
            events: list[ExternalEvent[HttpResource]] = []
            if "digest" in state:
                events.append(Removed(self._from_state()))
            elif "digest" in before:
                events.append(Removed(self._from_state(before)))
            return Changeset(events, dict.fromkeys(stale), state, self._forget)
        new_state = _state_of(resource)
        delta: StateDelta = {k: v for k, v in new_state.items() if before.get(k) != v}
        delta.update({k: None for k in stale if k not in new_state})
        if "digest" not in state:
            event: ExternalEvent[HttpResource] = Added(resource)
        elif state["digest"] != resource.digest or "digest" in before:
            event = Modified(resource)
        else:
            event = Added(resource)
        return Changeset([event], delta, state, lambda: self._remember(resource))

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

    async def _fetch(self, *, conditional: bool = True) -> HttpResource | None:
        """GET the URL; None for 304; a resource with an empty body for 404/410."""
        headers = dict(self._headers)
        if conditional and "digest" in self._state:
            if etag := self._state.get("etag"):
                headers["If-None-Match"] = etag
            elif last_modified := self._state.get("last_modified"):
                headers["If-Modified-Since"] = last_modified
        try:
            async with self._http().stream("GET", self.url, headers=headers) as response:
                status = response.status_code
                if status == 304 and conditional and "digest" in self._state:
                    return None
                if status in _GONE:
                    return HttpResource(self.url, status, b"")
                if not 200 <= status < 300:
                    raise HttpStatusError(self.url, status)
                body = await self._read_capped(response)
                return HttpResource(
                    url=self.url,
                    status=status,
                    body=body,
                    etag=response.headers.get("etag"),
                    last_modified=response.headers.get("last-modified"),
                    content_type=response.headers.get("content-type"),
                )
        except httpx.TransportError as exc:
            raise SourceUnavailableError(f"GET {self.url} failed: {_describe(exc)}") from exc
        except httpx.HTTPError as exc:
            raise SourceError(f"GET {self.url} failed: {_describe(exc)}") from exc

    async def _read_capped(self, response: httpx.Response) -> bytes:
        cap = self.max_body_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise BodyTooLargeError(self.url, cap)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise BodyTooLargeError(self.url, cap)
            chunks.append(chunk)
        return b"".join(chunks)


def _state_of(resource: HttpResource) -> dict[str, str]:
    state = {"digest": resource.digest, "status": str(resource.status)}
    if resource.etag:
        state["etag"] = resource.etag
    if resource.last_modified:
        state["last_modified"] = resource.last_modified
    if resource.content_type:
        state["content_type"] = resource.content_type
    return state


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
