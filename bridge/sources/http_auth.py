"""What an HTTP source sends, and where; what it trusts.

Credentials (a bearer token, basic auth, header values) may be given as a string, a
:class:`~bridge.secrets.Secret` or a function: the last two are asked for their value on every
request, so a token file that is rotated in place (Kubernetes projected service-account tokens)
is used from the next poll on. Redirects are followed by the poller itself, at most
``max_redirects`` of them: only to ``http``/``https``, never from ``https`` to ``http``, and to
any other origin (scheme, host, port) than the watched URL's only with harmless headers (no
``Authorization``, no ``Cookie``, no custom header), whatever the client's own settings.

TLS: :func:`tls_context` makes the ``ssl.SSLContext`` for a custom CA or a client certificate
(mutual TLS).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

import httpx

from bridge.errors import RedirectError
from bridge.secrets import Secret, redact_url
from bridge.tls import client_context

__all__ = [
    "FORWARDABLE",
    "SCHEMES",
    "RedirectError",
    "SecretValue",
    "follow_redirect",
    "origin",
    "origin_of",
    "tls_context",
]

SCHEMES = ("http", "https")
FORWARDABLE = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "connection",
        "host",
        "if-modified-since",
        "if-none-match",
        "pragma",
        "user-agent",
    }
)
"""The only request headers sent to another origin than the watched URL's after a redirect."""

SecretValue = str | Secret | Callable[[], str]
"""A credential: a literal, a :class:`Secret` (re-read when its file changes) or a function;
the last two are asked for the value on every request."""


def tls_context(
    *,
    verify: bool = True,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for ``httpx.AsyncClient(verify=...)``.

    ``ca_file``: the CA bundle (PEM) that signs the server's certificate, instead of the default
    (certifi's, or ``$SSL_CERT_FILE``); ``cert_file`` + ``key_file``: a client certificate for
    mutual TLS; ``verify=False`` skips verifying the server (testing only). Raises ``OSError``
    or ``ssl.SSLError`` when a file cannot be loaded.

    Contexts are shared (:func:`bridge.tls.client_context`): the same arguments (and files
    unchanged since) give the same context, so a thousand sources do not load a thousand
    copies of the CA bundle (~0.8 MB and 20 ms each).
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file must be given together")
    return client_context(
        verify=verify,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        default_ca="certifi",
        errors="raise",
    )


def follow_redirect(
    url: httpx.URL,
    response: httpx.Response,
    visited: list[httpx.URL],
    *,
    max_redirects: int,
    where: str,
) -> httpx.URL:
    """The URL a redirect response points to, if the rules allow following it."""
    status, location = response.status_code, response.headers["location"]
    here = redact_url(str(url))
    try:
        target = url.join(location)
    except httpx.InvalidURL as exc:
        raise RedirectError(
            f"{where}: {here} answered HTTP {status} with an invalid Location: {exc}"
        ) from exc
    there = redact_url(str(target))
    if max_redirects == 0:
        raise RedirectError(
            f"{where}: {here} answered HTTP {status} redirecting to {there}, "
            "but redirects are disabled (max_redirects: 0)"
        )
    if target.scheme not in SCHEMES:
        raise RedirectError(
            f"{where}: redirect from {here} to {there} refused: "
            "only http:// and https:// URLs are followed"
        )
    if url.scheme == "https" and target.scheme == "http":
        raise RedirectError(
            f"{where}: redirect from {here} to {there} refused: "
            "it would leave https for unencrypted http"
        )
    if target in visited:
        chain = " -> ".join(redact_url(str(u)) for u in [*visited, target])
        raise RedirectError(f"{where}: redirect loop: {chain}")
    if len(visited) > max_redirects:
        chain = " -> ".join(redact_url(str(u)) for u in [*visited, target])
        raise RedirectError(
            f"{where}: more than {max_redirects} redirects (max_redirects): {chain}"
        )
    return target


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    port = url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


def origin_of(value: SecretValue) -> str:
    if isinstance(value, Secret):
        return value.origin  # inline, env:NAME or file:PATH
    return "a literal" if isinstance(value, str) else "a function"
