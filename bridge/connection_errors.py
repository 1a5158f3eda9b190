"""Why a connection or a command failed, in words.

:func:`describe_error`: the cause of a failed connection or command in words: "authorization
violation", "TLS required by server", "certificate verify failed: ...", "WRONGPASS", "NOAUTH",
"NOPERM", with a hint at the setting to fix. Messages name servers by
:func:`~bridge.secrets.redact_url` only: no password, token or key ever appears in them.
:class:`ConnectError` is what :mod:`bridge.connections` raises when a connection cannot be made.
"""

from __future__ import annotations

import asyncio
import ssl

import nats.errors
import redis.exceptions

from bridge.errors import ConfigError, ConnectError, cause_chain

__all__ = ["ClientCertificateRequired", "ConnectError", "TlsNotOffered", "describe_error"]


class TlsNotOffered(nats.errors.SecureConnWantedError):
    """TLS is required (a ``tls://`` URL or a ``tls`` section); the server does not offer it."""

    def __str__(self) -> str:
        return "nats: TLS is required by the client configuration but the server does not offer it"


class ClientCertificateRequired(nats.errors.SecureConnFailedError):
    """The server requires a client certificate, and none is configured."""

    def __str__(self) -> str:
        return (
            "the server requires a client certificate (TLS verify): set tls.cert_file and "
            "tls.key_file"
        )


_HANDSHAKE_HINTS = {
    "CERTIFICATE_REQUIRED": "the server requires a client certificate: set tls.cert_file and "
    "tls.key_file",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate: set "
    "tls.cert_file and tls.key_file",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server rejected the client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the client certificate's CA",
    "WRONG_VERSION_NUMBER": "the server does not speak TLS on this port",
    "RECORD_LAYER_FAILURE": "the server does not speak TLS on this port",
    "PACKET_LENGTH_TOO_LONG": "the server does not speak TLS on this port",
    "UNEXPECTED_EOF_WHILE_READING": "the server closed the connection during the handshake",
}


def describe_error(exc: BaseException | None) -> str:
    """The cause of a failed connection or command, in words, with a hint where one helps.

    Never contains a secret: server error texts do not echo credentials, and URLs are not
    part of what this returns.
    """
    if exc is None:
        return "unknown error"
    chain = cause_chain(exc)
    for link in chain:
        if isinstance(link, ssl.SSLCertVerificationError):
            return (
                f"TLS: certificate verify failed: {link.verify_message or link.reason} (the "
                "server's certificate is not signed by a trusted CA or does not match the host: "
                "set tls.ca_file, or tls.server_name)"
            )
    for link in chain:
        if isinstance(link, ssl.SSLError):
            reason = link.reason or str(link)
            hint = _HANDSHAKE_HINTS.get(str(reason))
            return f"TLS handshake failed: {reason}" + (f" ({hint})" if hint else "")
    text = str(exc).strip()
    lowered = text.lower()
    if isinstance(exc, ConnectError | ConfigError):
        return text
    if isinstance(exc, ClientCertificateRequired):
        return str(exc)
    if isinstance(exc, TlsNotOffered):
        return (
            "the server does not offer TLS, but the client requires it (a tls:// URL or a tls "
            "section)"
        )
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in lowered:
        return (
            "authorization violation: the server refused the credentials (wrong or missing "
            "user/password, token, nkey or creds)"
        )
    if "authentication expired" in lowered or "user authentication revoked" in lowered:
        return f"authorization violation: {text.removeprefix('nats: ').strip(chr(39))}"
    if "tls required" in lowered or "secure connection - tls required" in lowered:
        return "TLS required by server (use a tls:// or rediss:// URL, or a tls section)"
    if "permissions violation" in lowered:
        return f"permissions violation: {text.removeprefix('nats: ').strip(chr(39))}"
    if isinstance(exc, redis.exceptions.AuthenticationError):
        if "wrongpass" in lowered or "invalid username-password" in lowered:
            return (
                "WRONGPASS: invalid username-password pair or user is disabled (check auth "
                "username/password)"
            )
        if (
            "noauth" in lowered
            or "authentication required" in lowered
            or "already authenticated" in lowered  # HELLO without AUTH
        ):
            return "NOAUTH: the server requires authentication (set auth.password)"
        if "no password is set" in lowered or "without any password configured" in lowered:
            return "AUTH refused: the server has no password set (remove auth.password)"
        return f"authentication failed: {text}"
    if isinstance(exc, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return (
            f"NOPERM: {text.removeprefix('NOPERM ')} (the ACL user lacks this right; see "
            "deploy/security/redis-acl.conf)"
        )
    if isinstance(exc, redis.exceptions.ConnectionError) and (
        "closed by server" in lowered or "reset by peer" in lowered
    ):
        # With TLS 1.3 a server that requires a client certificate may reset the connection
        # before its alert is read: the same symptom, so both causes are named.
        return (
            f"{text} (the server dropped the connection: if it is TLS-only, use rediss:// or "
            "a tls section; if it requires a client certificate, set tls.cert_file and "
            "tls.key_file)"
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) and not text:
        return "timed out"
    if isinstance(exc, FileNotFoundError | PermissionError) and exc.filename:
        return f"cannot read {str(exc.filename)!r}: {exc.strerror}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
