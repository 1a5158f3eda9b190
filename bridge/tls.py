"""Client-side TLS contexts, built once and shared, built again when a file rotates.

:func:`client_context` is used by every connection of koprs-bridge: the brokers and Redis
(:func:`bridge.connections.ssl_context`) and the HTTP sources
(:func:`bridge.sources.http.tls_context`). Two things differ between them and are explicit
parameters: the CA bundle used when no ``ca_file`` is given (``default_ca``: the system's for
brokers and Redis, certifi's, or ``$SSL_CERT_FILE``, as httpx does, for HTTP) and how a file
that cannot be loaded is reported (``errors``: a :class:`~bridge.errors.ConfigError` naming
the ``tls.*`` setting, or the ``OSError`` / ``ssl.SSLError`` / ``ValueError`` as raised).

Contexts are shared: the same arguments, with files unchanged since (inode, size, mtime),
give the same context, so a thousand sources do not load a thousand copies of a CA bundle
(~0.8 MB and 20 ms each); a rotated certificate is picked up by the next connection.
"""

from __future__ import annotations

import os
import ssl
from typing import Literal

from bridge.errors import ConfigError
from bridge.secrets import file_stamp, no_key_password

__all__ = ["DefaultCA", "TlsErrors", "client_context"]

DefaultCA = Literal["system", "certifi"]
"""The CAs trusted without a ``ca_file``: the system's, or certifi's (``$SSL_CERT_FILE`` /
``$SSL_CERT_DIR`` when set), as httpx trusts them."""
TlsErrors = Literal["config", "raise"]
"""A file that cannot be loaded: a ConfigError naming the setting, or the error raised."""

_Key = tuple[bool, str | None, str | None, str | None, DefaultCA, TlsErrors]
_CONTEXTS: dict[_Key, tuple[tuple[int, ...], ssl.SSLContext]] = {}
_KEPT = 64


def client_context(
    *,
    verify: bool = True,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    default_ca: DefaultCA,
    errors: TlsErrors,
) -> ssl.SSLContext:
    """The shared client context for these settings (see the module docstring).

    ``ca_file``: the CA bundle (PEM) that signs the server's certificate, instead of
    ``default_ca``; ``cert_file`` (+ ``key_file``, unless the key is in the same file): a
    client certificate for mutual TLS, its key unencrypted; ``verify=False`` skips verifying
    the server (testing only; with ``default_ca="certifi"`` the CA is not loaded at all, as
    httpx does).
    """
    files = tuple(None if f is None else os.fspath(f) for f in (ca_file, cert_file, key_file))
    key: _Key = (verify, files[0], files[1], files[2], default_ca, errors)
    stamp = _stamp(files, errors)
    cached = _CONTEXTS.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    context = _build(verify, *files, default_ca=default_ca, errors=errors)
    _CONTEXTS.pop(key, None)
    if len(_CONTEXTS) >= _KEPT:
        del _CONTEXTS[next(iter(_CONTEXTS))]
    _CONTEXTS[key] = (stamp, context)
    return context


def _stamp(files: tuple[str | None, ...], errors: TlsErrors) -> tuple[int, ...]:
    """The :func:`~bridge.secrets.file_stamp` of each file. An unreadable one: raised as is
    (``errors="raise"``, the error names the file), or -1s and the build reports it."""
    stamp: list[int] = []
    for path in files:
        if path is None:
            stamp += (0, 0, 0)
            continue
        try:
            stamp += file_stamp(path)
        except OSError:
            if errors == "raise":
                raise
            stamp += (-1, -1, -1)
    return tuple(stamp)


def _build(
    verify: bool,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    *,
    default_ca: DefaultCA,
    errors: TlsErrors,
) -> ssl.SSLContext:
    try:
        if not verify and default_ca == "certifi":
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # httpx's verify=False
        elif ca_file is None and default_ca == "certifi":
            import httpx  # certifi, or $SSL_CERT_FILE / $SSL_CERT_DIR

            context = httpx.create_ssl_context(verify=True)
        else:
            context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        if errors == "raise":
            raise
        raise ConfigError(f"tls.ca_file {ca_file!r}: cannot load it: {_ssl_text(exc)}") from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file, password=no_key_password)
        except (OSError, ssl.SSLError, ValueError) as exc:  # ValueError: an encrypted key
            if errors == "raise":
                raise
            raise ConfigError(
                f"tls.cert_file {cert_file!r} / key_file {key_file!r}: "
                f"cannot load the client certificate: {_ssl_text(exc)}"
            ) from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
