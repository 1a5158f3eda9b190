"""Credentials made by the tests: certificates (trustme), NATS nkeys and JWT ``.creds`` files.

* :func:`make_pki`: a CA, a server certificate for 127.0.0.1/localhost, a client certificate,
  and a second, untrusted CA with its own server certificate, as PEM files in a folder.
* :func:`nkey_pair`: a fresh NATS nkey (seed, public key) of a kind (user, account, operator).
* :class:`NatsOperator`: a NATS operator with one account (JetStream enabled) whose users are
  JWTs: :meth:`NatsOperator.server_config` is the server's configuration (memory resolver),
  :meth:`NatsOperator.creds` writes a user's ``.creds`` file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import trustme

from tests.support.servers import LOOPBACK

__all__ = ["NatsOperator", "Pki", "make_pki", "nkey_pair"]


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path
    """A CA that signed nothing the servers use: trusting only it fails verification."""
    other_server_cert: Path
    """A server certificate signed by the untrusted CA (with its key in the same file)."""


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(LOOPBACK, "localhost")
    client = ca.issue_cert("koprs-bridge-client")
    other = trustme.CA()
    other_server = other.issue_cert(LOOPBACK, "localhost")
    pki = Pki(
        ca_file=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca_file=folder / "other-ca.pem",
        other_server_cert=folder / "other-server.pem",
    )
    ca.cert_pem.write_to_path(str(pki.ca_file))
    server.private_key_pem.write_to_path(str(pki.server_key))
    pki.server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(pki.client_key))
    pki.client_cert.write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    other.cert_pem.write_to_path(str(pki.other_ca_file))
    other_server.private_key_and_cert_chain_pem.write_to_path(str(pki.other_server_cert))
    return pki


# -- NATS nkeys and JWTs ------------------------------------------------------------------------

_PREFIXES = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}


def nkey_pair(kind: str = "user") -> tuple[str, str]:
    """A new nkey of ``kind``: (seed ``S...``, public key ``U...``/``A...``/``O...``)."""
    seed = bytes(nkeys.encode_seed(os.urandom(32), _PREFIXES[kind])).decode()
    keys = nkeys.from_seed(bytearray(seed.encode()))
    return seed, bytes(keys.public_key).decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(claims: dict[str, Any], issuer_seed: str) -> str:
    """A NATS JWT (``ed25519-nkey``) of ``claims`` signed by ``issuer_seed``."""
    claims = {**claims, "iat": int(time.time()), "jti": ""}
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signer = nkeys.from_seed(bytearray(issuer_seed.encode()))
    signature = _b64(bytes(signer.sign(f"{header}.{payload}".encode())))
    return f"{header}.{payload}.{signature}"


class NatsOperator:
    """An operator, one JetStream account, and user JWTs for it (NATS decentralized auth)."""

    def __init__(self) -> None:
        self.operator_seed, self.operator_key = nkey_pair("operator")
        self.account_seed, self.account_key = nkey_pair("account")
        _, self.system_key = nkey_pair("account")
        self.operator_jwt = _jwt(
            {
                "iss": self.operator_key,
                "sub": self.operator_key,
                "name": "koprs-test-operator",
                "nats": {"type": "operator", "version": 2, "system_account": self.system_key},
            },
            self.operator_seed,
        )
        self.system_jwt = _jwt(
            {
                "iss": self.operator_key,
                "sub": self.system_key,
                "name": "SYS",
                "nats": {"type": "account", "version": 2, "limits": {"conn": -1}},
            },
            self.operator_seed,
        )
        self.account_jwt = _jwt(
            {
                "iss": self.operator_key,
                "sub": self.account_key,
                "name": "koprs-test-account",
                "nats": {
                    "type": "account",
                    "version": 2,
                    "limits": {
                        "subs": -1,
                        "data": -1,
                        "payload": -1,
                        "imports": -1,
                        "exports": -1,
                        "wildcards": True,
                        "conn": -1,
                        "leaf": -1,
                        "mem_storage": -1,
                        "disk_storage": -1,
                        "streams": -1,
                        "consumer": -1,
                    },
                    "default_permissions": {"pub": {}, "sub": {}},
                },
            },
            self.operator_seed,
        )

    def server_config(self) -> str:
        """``operator``, a memory resolver holding the account: the server's auth section."""
        return (
            f"operator: {self.operator_jwt}\n"
            f"system_account: {self.system_key}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.system_key}: {self.system_jwt}\n"
            f"  {self.account_key}: {self.account_jwt}\n"
            "}\n"
        )

    def creds(
        self, path: Path, *, publish: list[str] | None = None, subscribe: list[str] | None = None
    ) -> Path:
        """Write a new user's ``.creds`` file (JWT and seed) to ``path``; allowed subjects
        (None: everything)."""
        seed, key = nkey_pair("user")
        permissions: dict[str, Any] = {"pub": {}, "sub": {}}
        if publish is not None:
            permissions["pub"] = {"allow": publish}
        if subscribe is not None:
            permissions["sub"] = {"allow": subscribe}
        user_jwt = _jwt(
            {
                "iss": self.account_key,
                "sub": key,
                "name": path.stem,
                "nats": {
                    "type": "user",
                    "version": 2,
                    "subs": -1,
                    "data": -1,
                    "payload": -1,
                    **permissions,
                },
            },
            self.account_seed,
        )
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{user_jwt}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{seed}\n"
            "------END USER NKEY SEED------\n"
        )
        return path
