"""Authentication and TLS against real servers: every method end to end, every failure clear.

Servers (started once for this module, certificates made by trustme in the test):

* nats-server with TLS (custom CA) and users: password, nkey;
* nats-server with mutual TLS (client certificates verified) and token authentication;
* nats-server in operator mode (JWT ``.creds``), plaintext;
* redis-server TLS-only with ACL users, and one that also requires client certificates.

Each auth method publishes events through the bridge, read back with a client of the test.
Each failure (wrong password or token, plaintext against TLS, untrusted CA, missing client
certificate...) gives one warning per retry naming the server (password hidden) and the cause,
no traceback, readiness stays false, and the service goes on retrying; where a credential
comes from a ``{file: ...}`` secret, fixing the file lets it connect without a restart.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.cloudevents import header_value
from bridge.connections import (
    TlsConnection,
    connect_nats,
    nats_options,
    nats_tls_required,
    redis_client,
    ssl_context,
)
from bridge.errors import ConfigError
from bridge.secrets import Secret
from bridge.service.config import AuthConfig, TlsConfig
from bridge.subjects import encode_item_token
from tests.support.credentials import NatsOperator, Pki, make_pki, nkey_pair
from tests.support.security import (
    LogRecorder,
    nats_tls_block,
    recording_logs,
    redis_tls_args,
    running_bridge,
    tls_redis,
)
from tests.support.servers import NatsServer, RedisServer

pytestmark = pytest.mark.servers

BRIDGE_PASSWORD = "br1dge-pa55-Zq"
ADMIN_PASSWORD = "adm1n-pa55-Xw"
TOKEN = "t0ken-Vr9-secret"
REDIS_PASSWORD = "red1s-pa55-Km"
WRONG = "wr0ng-guess-Jp"
SOURCE = "drop"
SUBJECT = f"koprs.external.{SOURCE}.{encode_item_token('a.txt')}"


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def nkey_seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    seed, public = nkey_pair("user")
    path = tmp_path_factory.mktemp("nkey") / "bridge.nk"
    path.write_text(seed + "\n")
    return path, public


@pytest.fixture(scope="module")
def nats_tls(pki: Pki, nkey_seed: tuple[Path, str]) -> Iterator[NatsServer]:
    """TLS (server certificate only) with users: admin, bridge (password), an nkey user."""
    config = nats_tls_block(pki) + (
        "authorization {\n  users = [\n"
        f'    {{user: admin, password: "{ADMIN_PASSWORD}"}}\n'
        f'    {{user: bridge, password: "{BRIDGE_PASSWORD}"}}\n'
        f"    {{nkey: {nkey_seed[1]}}}\n"
        "  ]\n}\n"
    )
    with NatsServer(config=config) as server:
        yield server


@pytest.fixture(scope="module")
def nats_mtls(pki: Pki) -> Iterator[NatsServer]:
    """Mutual TLS (client certificates verified) and token authentication."""
    config = nats_tls_block(pki, verify=True) + f'authorization {{ token: "{TOKEN}" }}\n'
    with NatsServer(config=config) as server:
        yield server


@dataclass
class JwtServer:
    server: NatsServer
    operator: NatsOperator
    creds: Path


@pytest.fixture(scope="module")
def nats_jwt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtServer]:
    """Operator mode: users are JWTs signed by the account; plaintext."""
    operator = NatsOperator()
    creds = operator.creds(tmp_path_factory.mktemp("creds") / "bridge.creds")
    with NatsServer(config=operator.server_config()) as server:
        yield JwtServer(server, operator, creds)


def _redis_acl(folder: Path) -> Path:
    path = folder / "users.acl"
    path.write_text(f"user default off\nuser koprs on >{REDIS_PASSWORD} ~* &* +@all\n")
    return path


@pytest.fixture(scope="module")
def redis_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """TLS-only (``--port 0``), ACL user ``koprs``, the default user off."""
    acl = _redis_acl(tmp_path_factory.mktemp("redis-acl"))
    with tls_redis([*redis_tls_args(pki), "--aclfile", str(acl)]) as server:
        yield server


@pytest.fixture(scope="module")
def redis_mtls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """TLS-only with client certificates required."""
    acl = _redis_acl(tmp_path_factory.mktemp("redis-acl-mtls"))
    with tls_redis([*redis_tls_args(pki, auth_clients="yes"), "--aclfile", str(acl)]) as server:
        yield server


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    """A folder source with one file: the bridge publishes one Added event."""
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    return folder


def bridge_config(
    url: str,
    drop: Path,
    *,
    tls: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    election: dict[str, Any] | None = None,
) -> dict[str, Any]:
    broker: dict[str, Any] = {"url": url, "ack_timeout": "3s"}
    if tls is not None:
        broker["tls"] = tls
    if auth is not None:
        broker["auth"] = auth
    config: dict[str, Any] = {
        "broker": broker,
        "sources": [
            {"name": SOURCE, "interval": 0.05, "max_backoff": 0.2, "local": {"path": str(drop)}}
        ],
    }
    if election is not None:
        config["leader_election"] = election
    return config


def ca_only(pki: Pki) -> dict[str, Any]:
    return {"ca_file": str(pki.ca_file)}


def mutual(pki: Pki) -> dict[str, Any]:
    return {
        "ca_file": str(pki.ca_file),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }


def retry_warnings(logs: LogRecorder) -> list[logging.LogRecord]:
    return [r for r in logs.warnings("bridge.service") if "retrying in" in r.getMessage()]


async def assert_retries_with(
    logs: LogRecorder, connected: bool, *expected: str, secrets: tuple[str, ...] = ()
) -> str:
    """Two retries were logged, each one warning naming ``expected`` (case-insensitive);
    nothing else warned, nothing has a traceback, readiness is false. Returns the message."""
    await logs.wait_for(lambda _: len(retry_warnings(logs)) >= 2)
    assert not connected, "readiness must stay false"
    message = retry_warnings(logs)[0].getMessage()
    for text in expected:
        assert text.lower() in message.lower(), message
    for secret in secrets:
        assert secret not in logs.text()
    noisy = [r for r in logs.warnings() if r not in retry_warnings(logs)]
    assert noisy == [], [r.getMessage() for r in noisy]
    assert all(r.exc_info is None for r in logs.records if r.levelno >= logging.WARNING)
    assert "Traceback" not in logs.text()
    return message


# -- NATS: each method end to end -----------------------------------------------------------


@dataclass
class NatsCase:
    url: str
    tls: dict[str, Any] | None
    auth: dict[str, Any]
    reader_tls: TlsConfig | None
    reader_auth: AuthConfig


def nats_case(method: str, request: pytest.FixtureRequest) -> NatsCase:
    pki: Pki = request.getfixturevalue("pki")
    ca = TlsConfig(ca_file=pki.ca_file)
    admin = AuthConfig(username="admin", password=Secret.inline(ADMIN_PASSWORD))
    if method == "password":
        server: NatsServer = request.getfixturevalue("nats_tls")
        auth = {"username": "bridge", "password": BRIDGE_PASSWORD}
        return NatsCase(server.url, ca_only(pki), auth, ca, admin)
    if method == "nkey":
        server = request.getfixturevalue("nats_tls")
        seed_file, _ = request.getfixturevalue("nkey_seed")
        return NatsCase(server.url, ca_only(pki), {"nkey_seed_file": str(seed_file)}, ca, admin)
    if method == "token-mtls":
        server = request.getfixturevalue("nats_mtls")
        tls = TlsConfig(ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
        token = AuthConfig(token=Secret.inline(TOKEN))
        return NatsCase(server.url, mutual(pki), {"token": TOKEN}, tls, token)
    assert method == "creds"
    jwt: JwtServer = request.getfixturevalue("nats_jwt")
    creds = AuthConfig(creds_file=jwt.creds)
    return NatsCase(jwt.server.url, None, {"creds_file": str(jwt.creds)}, None, creds)


@pytest.mark.parametrize("method", ["password", "nkey", "token-mtls", "creds"])
async def test_nats_auth_method_end_to_end(
    method: str, request: pytest.FixtureRequest, drop: Path
) -> None:
    case = nats_case(method, request)
    config = bridge_config(case.url, drop, tls=case.tls, auth=case.auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, published):
            await published.wait_for(1)
            assert bridge.connected.is_set()
    assert logs.warnings() == []
    _, event = published.events[0]
    nc = await connect_nats(case.url, case.reader_tls, case.reader_auth)
    try:
        msg = await nc.jetstream().get_last_msg("KOPRS_EXTERNAL", SUBJECT)
    finally:
        await nc.close()
    assert msg.headers is not None
    assert header_value(msg.headers["ce-id"]) == event.id
    assert header_value(msg.headers["ce-subject"]) == "a.txt"


# -- NATS: failures -------------------------------------------------------------------------


async def test_nats_wrong_password(pki: Pki, nats_tls: NatsServer, drop: Path) -> None:
    auth = {"username": "bridge", "password": WRONG}
    config = bridge_config(nats_tls.url, drop, tls=ca_only(pki), auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            message = await assert_retries_with(
                logs, bridge.connected.is_set(), nats_tls.url, "authorization violation",
                secrets=(WRONG,),
            )  # fmt: skip
    assert "the server refused the credentials" in message


async def test_nats_wrong_token(pki: Pki, nats_mtls: NatsServer, drop: Path) -> None:
    config = bridge_config(nats_mtls.url, drop, tls=mutual(pki), auth={"token": WRONG})
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), nats_mtls.url, "authorization violation",
                secrets=(WRONG,),
            )  # fmt: skip


async def test_nats_wrong_creds(nats_jwt: JwtServer, tmp_path: Path, drop: Path) -> None:
    stranger = NatsOperator().creds(tmp_path / "stranger.creds")  # signed by another account
    config = bridge_config(nats_jwt.server.url, drop, auth={"creds_file": str(stranger)})
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), nats_jwt.server.url, "authorization violation"
            )


async def test_nats_client_without_tls_settings_against_a_tls_server(
    nats_tls: NatsServer, drop: Path
) -> None:
    """nats-py upgrades to TLS when the server requires it, with the system CAs: the test CA
    is not among them."""
    auth = {"username": "bridge", "password": BRIDGE_PASSWORD}
    config = bridge_config(nats_tls.url, drop, auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), nats_tls.url, "certificate verify failed",
                "tls.ca_file", secrets=(BRIDGE_PASSWORD,),
            )  # fmt: skip


async def test_nats_untrusted_ca(pki: Pki, nats_tls: NatsServer, drop: Path) -> None:
    auth = {"username": "bridge", "password": BRIDGE_PASSWORD}
    tls = {"ca_file": str(pki.other_ca_file)}
    config = bridge_config(nats_tls.url, drop, tls=tls, auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), nats_tls.url, "certificate verify failed",
                secrets=(BRIDGE_PASSWORD,),
            )  # fmt: skip


async def test_nats_missing_client_certificate(pki: Pki, nats_mtls: NatsServer, drop: Path) -> None:
    config = bridge_config(nats_mtls.url, drop, tls=ca_only(pki), auth={"token": TOKEN})
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), nats_mtls.url,
                "requires a client certificate", "tls.cert_file", secrets=(TOKEN,),
            )  # fmt: skip


async def test_nats_tls_required_by_the_client_but_not_offered(
    pki: Pki, nats_jwt: JwtServer, drop: Path
) -> None:
    """A tls section (or tls://) makes TLS mandatory: no plaintext fallback, no credentials
    sent in clear."""
    auth = {"creds_file": str(nats_jwt.creds)}
    config = bridge_config(nats_jwt.server.url, drop, tls=ca_only(pki), auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), nats_jwt.server.url, "does not offer TLS"
            )
    url = nats_jwt.server.url.replace("nats://", "tls://")
    config = bridge_config(url, drop, auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(logs, bridge.connected.is_set(), url, "does not offer TLS")


async def test_nats_password_file_fixed_while_retrying(
    pki: Pki, nats_tls: NatsServer, drop: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "nats-password"
    secret.write_text(WRONG + "\n")
    auth = {"username": "bridge", "password": {"file": str(secret)}}
    config = bridge_config(nats_tls.url, drop, tls=ca_only(pki), auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, published):
            await logs.wait_for(lambda _: len(retry_warnings(logs)) >= 1)
            assert "authorization violation" in retry_warnings(logs)[0].getMessage()
            assert not bridge.connected.is_set()
            secret.write_text(BRIDGE_PASSWORD + "\n")  # rotated: read again at the next try
            await published.wait_for(1)
            assert bridge.connected.is_set()
    assert BRIDGE_PASSWORD not in logs.text()
    assert WRONG not in logs.text()


# -- Redis: end to end ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tls", "mtls"])
async def test_redis_acl_user_over_tls_end_to_end(
    mode: str, request: pytest.FixtureRequest, pki: Pki, drop: Path
) -> None:
    """The sink and the leader election both on TLS with an ACL user and password."""
    server: RedisServer = request.getfixturevalue("redis_tls" if mode == "tls" else "redis_mtls")
    tls = ca_only(pki) if mode == "tls" else mutual(pki)
    auth = {"username": "koprs", "password": REDIS_PASSWORD}
    election = {"redis_url": server.url, "lease_ttl": "3s", "tls": tls, "auth": auth}
    config = bridge_config(server.url, drop, tls=tls, auth=auth, election=election)
    with recording_logs() as logs:
        async with running_bridge(config, replica="replica-a") as (bridge, published):
            await published.wait_for(1)
            assert bridge.connected.is_set()
            reader = redis_client(
                server.url,
                TlsConfig(ca_file=pki.ca_file)
                if mode == "tls"
                else TlsConfig(
                    ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key
                ),
                AuthConfig(username="koprs", password=Secret.inline(REDIS_PASSWORD)),
            )
            try:
                entries: Any = await reader.xrange(f"koprs:external:{SOURCE}")
                lease: Any = await reader.get(f"koprs:bridge:{{{SOURCE}}}:lease")
            finally:
                await reader.aclose()
    assert logs.warnings() == []
    _, event = published.events[0]
    fields = {k.decode(): v.decode() for k, v in entries[-1][1].items()}
    assert fields["ce-id"] == event.id
    assert header_value(fields["ce-subject"]) == "a.txt"
    assert lease is not None
    assert lease.decode().startswith("replica-a|")


# -- Redis: failures ------------------------------------------------------------------------


async def test_redis_wrong_password(pki: Pki, redis_tls: RedisServer, drop: Path) -> None:
    auth = {"username": "koprs", "password": WRONG}
    config = bridge_config(redis_tls.url, drop, tls=ca_only(pki), auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), redis_tls.url, "WRONGPASS", secrets=(WRONG,)
            )


async def test_redis_no_credentials(pki: Pki, redis_tls: RedisServer, drop: Path) -> None:
    config = bridge_config(redis_tls.url, drop, tls=ca_only(pki))
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), redis_tls.url, "NOAUTH", "auth.password"
            )


async def test_redis_plaintext_client_against_tls_only_server(
    redis_tls: RedisServer, drop: Path
) -> None:
    url = redis_tls.url.replace("rediss://", "redis://")
    auth = {"username": "koprs", "password": REDIS_PASSWORD}
    with recording_logs() as logs:
        async with running_bridge(bridge_config(url, drop, auth=auth)) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), url, "TLS-only", "rediss://",
                secrets=(REDIS_PASSWORD,),
            )  # fmt: skip


async def test_redis_untrusted_ca(pki: Pki, redis_tls: RedisServer, drop: Path) -> None:
    auth = {"username": "koprs", "password": REDIS_PASSWORD}
    tls = {"ca_file": str(pki.other_ca_file)}
    with recording_logs() as logs:
        async with running_bridge(bridge_config(redis_tls.url, drop, tls=tls, auth=auth)) as (
            bridge,
            _,
        ):
            await assert_retries_with(
                logs, bridge.connected.is_set(), redis_tls.url, "certificate verify failed",
                secrets=(REDIS_PASSWORD,),
            )  # fmt: skip


async def test_redis_missing_client_certificate(
    pki: Pki, redis_mtls: RedisServer, drop: Path
) -> None:
    auth = {"username": "koprs", "password": REDIS_PASSWORD}
    config = bridge_config(redis_mtls.url, drop, tls=ca_only(pki), auth=auth)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), redis_mtls.url, "client certificate",
                secrets=(REDIS_PASSWORD,),
            )  # fmt: skip


async def test_leader_election_redis_wrong_password(
    pki: Pki, nats_tls: NatsServer, redis_tls: RedisServer, drop: Path
) -> None:
    """The broker is fine, the election's Redis refuses: not ready, retried, said why."""
    election = {
        "redis_url": redis_tls.url,
        "tls": ca_only(pki),
        "auth": {"username": "koprs", "password": WRONG},
    }
    auth = {"username": "bridge", "password": BRIDGE_PASSWORD}
    config = bridge_config(nats_tls.url, drop, tls=ca_only(pki), auth=auth, election=election)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, _):
            await assert_retries_with(
                logs, bridge.connected.is_set(), f"leader election Redis {redis_tls.url}",
                "WRONGPASS", secrets=(WRONG, BRIDGE_PASSWORD),
            )  # fmt: skip


async def test_redis_password_file_fixed_while_retrying(
    pki: Pki, redis_tls: RedisServer, drop: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(WRONG + "\n")
    auth = {"username": "koprs", "password": {"file": str(secret)}}
    election = {"redis_url": redis_tls.url, "tls": ca_only(pki), "auth": auth}
    config = bridge_config(redis_tls.url, drop, tls=ca_only(pki), auth=auth, election=election)
    with recording_logs() as logs:
        async with running_bridge(config) as (bridge, published):
            await logs.wait_for(lambda _: len(retry_warnings(logs)) >= 1)
            assert "WRONGPASS" in retry_warnings(logs)[0].getMessage()
            assert not bridge.connected.is_set()
            secret.write_text(REDIS_PASSWORD + "\n")
            await published.wait_for(1)
            assert bridge.connected.is_set()
    assert REDIS_PASSWORD not in logs.text()
    assert WRONG not in logs.text()


# -- the building blocks, without servers ---------------------------------------------------


def test_ssl_context_follows_rotated_files(pki: Pki, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_file.read_bytes())
    tls = TlsConfig(ca_file=ca, cert_file=pki.client_cert, key_file=pki.client_key)
    first = ssl_context(tls)
    assert ssl_context(tls) is first, "cached while the files do not change"
    ca.write_bytes(pki.other_ca_file.read_bytes() + pki.ca_file.read_bytes())
    assert ssl_context(tls) is not first, "built again after a rotation"
    assert ssl_context(TlsConfig(verify=False)).verify_mode == ssl.CERT_NONE


def test_unusable_tls_files_are_a_config_error_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"broken\.pem"):
        ssl_context(TlsConfig(ca_file=broken))
    with pytest.raises(ConfigError, match="client certificate"):
        ssl_context(TlsConfig(cert_file=broken, key_file=pki.client_key))
    # an encrypted key is a clear error too, not a passphrase prompt on the terminal
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        ssl_context(TlsConfig(cert_file=pki.client_cert, key_file=encrypted))


def test_nats_options_per_method(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("one\n")
    secret = Secret.from_file(password)
    options = nats_options("nats://a:4222, nats://b:4222", None, AuthConfig(password=secret))
    assert options["servers"] == ["nats://a:4222", "nats://b:4222"]
    assert options["user"] == ""
    assert options["password"]() == "one"
    password.write_text("two-longer\n")
    assert options["password"]() == "two-longer", "read again at each connection"
    token = nats_options("nats://a", auth=AuthConfig(token=Secret.inline("t")))
    assert token["token"]() == "t"
    assert "password" not in token
    seed = nats_options("nats://a", auth=AuthConfig(nkey_seed_file=password))
    assert seed["nkeys_seed"] == str(password)
    creds = nats_options("nats://a", auth=AuthConfig(creds_file=password))
    assert creds["user_credentials"] == str(password)
    named = nats_options("tls://a", TlsConfig(server_name="nats.internal"))
    assert named["tls_hostname"] == "nats.internal"
    assert nats_tls_required("tls://a:4222", None)
    assert nats_tls_required("nats://a:4222", TlsConfig())
    assert not nats_tls_required("nats://a:4222", None)


async def test_redis_client_credentials_and_tls(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("first\n")
    auth = AuthConfig(username="koprs", password=Secret.from_file(password))
    client = redis_client("redis://url-user:url-pass@127.0.0.1:1/2", None, auth)
    try:
        kwargs = client.connection_pool.connection_kwargs
        provider = kwargs["credential_provider"]
        assert provider.get_credentials() == ("koprs", "first")
        password.write_text("second-one\n")
        assert provider.get_credentials() == ("koprs", "second-one")
        assert "password" not in kwargs, "the configured auth wins over the URL's"
        assert kwargs["db"] == 2
        assert client.connection_pool.connection_class is not TlsConnection
    finally:
        await client.aclose()
    client = redis_client("redis://:only-pass@127.0.0.1:1/0", TlsConfig())
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["credential_provider"].get_credentials() == ("only-pass",)
        assert client.connection_pool.connection_class is TlsConnection
    finally:
        await client.aclose()
    client = redis_client("rediss://127.0.0.1:1/0")
    try:
        assert client.connection_pool.connection_class is TlsConnection
    finally:
        await client.aclose()
