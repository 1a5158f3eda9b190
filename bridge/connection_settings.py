"""The settings of a NATS or Redis connection: TLS and credentials.

Used by :mod:`bridge.connections` (which makes every connection), the sinks, the consumers and
the service config (:mod:`bridge.service.config`), which reads them from the ``tls`` and
``auth`` sections of ``broker`` and ``leader_election``.
"""

from __future__ import annotations

from collections.abc import Iterable

from bridge.secrets import Secret
from bridge.settings import ConfigModel, ExistingFile, Flag, Problem, Text, together

__all__ = ["AuthConfig", "RedisAuthConfig", "TlsConfig"]


class TlsConfig(ConfigModel):
    """TLS for a connection: a custom CA, an optional client certificate (mTLS)."""

    ca_file: ExistingFile | None = None
    """CA bundle (PEM) that signs the server's certificate (default: the system's)."""
    cert_file: ExistingFile | None = None
    """Client certificate (PEM) for mutual TLS; needs ``key_file``."""
    key_file: ExistingFile | None = None
    """The client certificate's private key (PEM, not encrypted)."""
    verify: Flag = True
    """False skips verifying the server's certificate (testing only)."""
    server_name: Text | None = None
    """Expected host name in the server's certificate (default: the URL's host)."""

    @classmethod
    def _given_problems(cls, given: set[str]) -> Iterable[Problem]:
        return together(given, "cert_file", "key_file")


class RedisAuthConfig(ConfigModel):
    """Credentials for Redis: an ACL ``username`` (optional) and ``password``."""

    username: Text | None = None
    password: Secret | None = None


class AuthConfig(RedisAuthConfig):
    """Credentials for a broker or Redis; at most one method (user/password, token, nkey, creds).

    ``token``, ``nkey_seed_file`` and ``creds_file`` are NATS-only; Redis takes an ACL
    ``username`` (optional) and ``password``. Credentials in the URL work too.
    """

    token: Secret | None = None
    nkey_seed_file: ExistingFile | None = None
    creds_file: ExistingFile | None = None
    """NATS JWT credentials (``.creds``) file."""

    @classmethod
    def _given_problems(cls, given: set[str]) -> Iterable[Problem]:
        methods = [
            method
            for method, key in (
                ("username/password", "password"),
                ("token", "token"),
                ("nkey_seed_file", "nkey_seed_file"),
                ("creds_file", "creds_file"),
            )
            if key in given
        ]
        if len(methods) > 1:
            yield Problem(f"give one authentication method, not {' and '.join(methods)}")

    def nats_problems(self) -> Iterable[Problem]:
        """What is wrong with these credentials for NATS."""
        if self.username is not None and self.password is None:
            yield Problem("username needs a password")

    def redis_problems(self) -> Iterable[Problem]:
        """What is wrong with these credentials for Redis: the NATS-only keys."""
        unknown = sorted(self.model_fields_set - set(RedisAuthConfig.model_fields))
        if unknown:
            allowed = ", ".join(sorted(RedisAuthConfig.model_fields))
            yield Problem(f"unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
