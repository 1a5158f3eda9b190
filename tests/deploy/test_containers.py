"""The container-backed test servers (``KOPRS_TEST_CONTAINERS=1``, ``tests/support/containers.py``).

What the shared server tests (``tests/test_servers.py``) cannot see: the servers really are
containers, published on 127.0.0.1 only, and the S3 container checks credentials. Run with the
switch set (``scripts/compose-e2e --pytest ...`` does); skipped otherwise.
"""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.support import containers
from tests.support.servers import LOOPBACK, NatsServer, RedisServer, S3Server

pytestmark = pytest.mark.skipif(
    not containers.containers_wanted(), reason="KOPRS_TEST_CONTAINERS is not set"
)


def _bindings(server: object) -> dict[str, list[dict[str, str]]]:
    assert isinstance(server, containers.ContainerServer)
    assert server._container is not None
    wrapped = server._container.get_wrapped_container()
    wrapped.reload()
    bindings: dict[str, list[dict[str, str]]] = wrapped.attrs["HostConfig"]["PortBindings"]
    return bindings


@pytest.mark.usefixtures("redis_url", "nats_url")
def test_session_servers_are_containers_published_on_loopback_only(
    redis_server: RedisServer, nats_server: NatsServer, s3_server: S3Server
) -> None:
    expected = {
        redis_server: {"6379/tcp": [redis_server.port]},
        nats_server: {"4222/tcp": [nats_server.port], "8222/tcp": [nats_server.monitor_port]},
        s3_server: {"9000/tcp": [s3_server.port]},
    }
    for server, ports in expected.items():
        bindings = _bindings(server)
        assert {k: [int(b["HostPort"]) for b in v] for k, v in bindings.items()} == ports
        assert {b["HostIp"] for v in bindings.values() for b in v} == {LOOPBACK}
        assert server.pid is not None  # the container's process, as the host sees it


def test_s3_container_checks_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    intruder = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="not-the-secret",
        region_name=s3_server.region,
    )
    with pytest.raises(ClientError):
        intruder.get_object(Bucket=s3_bucket, Key="k")
