"""connections.redis_session: a Redis client for a short job (status, tail), closed after it,
its errors in words with the password hidden."""

from __future__ import annotations

import socket

import pytest

from bridge.connections import redis_session
from bridge.errors import BridgeError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_refused_connection_is_a_bridge_error_naming_the_job_not_the_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(BridgeError) as caught:
        async with redis_session(url, doing="ping", timeout_s=5) as client:
            await client.ping()
    message = str(caught.value)
    assert message.startswith("cannot ping redis://:***@127.0.0.1:")
    assert "hunter2" not in message
    assert "connect call failed" in message.lower()


async def test_the_client_works_in_the_block_and_is_closed_after(redis_url: str) -> None:
    async with redis_session(redis_url, doing="ping") as client:
        assert await client.ping()
    connections = client.connection_pool._get_free_connections()
    assert connections, "the ping used a connection"
    assert not any(connection.is_connected for connection in connections)
