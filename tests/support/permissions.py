"""Servers loaded with the shipped least-privilege files (``deploy/security/``), their users,
and how to read what the servers refused (NATS permission violations, the Redis ACL log).

The module-scoped fixtures ``nats_server``, ``nats_precreated`` and ``redis_server`` replace
the session servers in the modules that import them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client

from bridge.connections import connect_nats, redis_client
from bridge.secrets import Secret
from bridge.service.config import AuthConfig
from tests.support.servers import NatsServer, RedisServer

SECURITY = Path(__file__).resolve().parents[2] / "deploy" / "security"
STREAM = "KOPRS_EXTERNAL"
ADMIN = "adm1n-Pw-q8"
BRIDGE_NATS = "br1dge-nats-Pw-z4"
CONSUMER_NATS = "c0nsumer-nats-Pw-r2"
BRIDGE_REDIS = "br1dge-redis-Pw-k7"
CONSUMER_REDIS = "c0nsumer-redis-Pw-m3"


def nats_users(*, precreated_stream: bool = False, without: tuple[str, ...] = ()) -> str:
    """The shipped NATS users, passwords filled in, plus ``admin``; with
    ``precreated_stream`` the bridge's CREATE/UPDATE lines dropped, as the file explains; the
    lines naming a subject of ``without`` dropped."""
    text = (SECURITY / "nats-permissions.conf").read_text()
    text = text.replace("$KOPRS_BRIDGE_NATS_PASSWORD", f'"{BRIDGE_NATS}"')
    text = text.replace("$KOPRS_CONSUMER_NATS_PASSWORD", f'"{CONSUMER_NATS}"')
    assert text.count("users = [") == 1
    text = text.replace("users = [", f'users = [\n    {{user: admin, password: "{ADMIN}"}}', 1)
    if precreated_stream:
        lines = text.splitlines()
        text = "\n".join(
            line
            for line in lines
            if f"$JS.API.STREAM.CREATE.{STREAM}" not in line
            and f"$JS.API.STREAM.UPDATE.{STREAM}" not in line
        )
    for subject in without:
        assert f'"{subject}"' in text, subject
        text = "\n".join(line for line in text.splitlines() if f'"{subject}"' not in line)
    return text


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer(config=nats_users()) as server:
        yield server


@pytest.fixture(scope="module")
def nats_precreated() -> Iterator[NatsServer]:
    with NatsServer(config=nats_users(precreated_stream=True)) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    shipped = (SECURITY / "redis-acl.conf").read_text()
    shipped = shipped.replace("CHANGE_ME_BRIDGE_PASSWORD", BRIDGE_REDIS)
    shipped = shipped.replace("CHANGE_ME_CONSUMER_PASSWORD", CONSUMER_REDIS)
    acl = tmp_path_factory.mktemp("acl") / "users.acl"
    acl.write_text(f"user default off\nuser admin on >{ADMIN} ~* &* +@all\n{shipped}")
    with RedisServer(extra_args=["--aclfile", str(acl)]) as server:
        yield server


def auth(user: str, password: str) -> AuthConfig:
    return AuthConfig(username=user, password=Secret.inline(password))


async def admin_nats(server: NatsServer) -> Client:
    return await connect_nats(server.url, auth=auth("admin", ADMIN))


@pytest.fixture
async def admin_redis(redis_server: RedisServer) -> Any:
    client: Any = redis_client(redis_server.url, auth=auth("admin", ADMIN))
    await client.execute_command("FLUSHALL")
    await client.execute_command("ACL", "LOG", "RESET")
    yield client
    await client.aclose()


async def fresh_stream(server: NatsServer) -> None:
    nc = await admin_nats(server)
    try:
        js = nc.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(STREAM)
    finally:
        await nc.close()


def violations(server: NatsServer) -> list[str]:
    return [line for line in server.log_since_start().splitlines() if "Violation" in line]


async def acl_log(admin: Any) -> list[Any]:
    entries: list[Any] = await admin.execute_command("ACL", "LOG")
    return entries
