"""``koprs-bridge tail`` and ``status`` on Redis Cluster and Sentinel; ``tail`` on the NATS
cluster across a stream leader change.

The Redis tail tests of tests/consumer/test_tail.py run here with ``redis_url`` pointing at
each topology: ``tail --broker redis+cluster://...`` discovers the streams on every primary
(SCAN per node), ``--config`` with a cluster or sentinel ``broker.url`` follows them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bridge.connections import redis_client
from bridge.errors import PublishError
from bridge.events import Added, Modified
from bridge.ha.keys import DEFAULT_PREFIX
from bridge.ha.leases import LeaseClient
from bridge.sinks.nats import NatsSink
from tests.consumer import test_tail as single
from tests.support.clusters import NatsCluster, kill
from tests.support.events import nats_test_config
from tests.support.tailing import tail

pytestmark = [pytest.mark.clusters, pytest.mark.servers]

for _name, _test in vars(single).items():
    if _name.startswith("test_redis_") and callable(_test):
        globals()[_name] = _test


@pytest.fixture(params=["cluster", "sentinel"])
def redis_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"redis_{request.param}_url")
    return url


async def test_status_reads_the_election_state(redis_url: str, tmp_path: Path) -> None:
    client = redis_client(redis_url)
    try:
        leases = LeaseClient(client, "replica-a", ttl_s=30, prefix=DEFAULT_PREFIX)
        [_lease] = await leases.acquire_many(["files"])  # lives by the membership:
        await leases.heartbeat(["files"])  # renewed here
        config = tmp_path / "bridge.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "broker": {"url": redis_url},
                    "leader_election": {"redis_url": redis_url},
                    "sources": [
                        {"name": n, "interval": 1, "local": {"path": str(tmp_path)}}
                        for n in ("files", "web")
                    ],
                }
            )
        )
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "status", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(single.REPO)},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert "replica-a" in json.dumps(status)
    finally:
        await client.aclose()


def test_the_imported_tests_take_redis_url() -> None:
    imported = [n for n in globals() if n.startswith("test_redis_")]
    assert imported
    for name in imported:
        assert "redis_url" in inspect.signature(globals()[name]).parameters


async def test_tail_follows_an_r3_stream_across_a_leader_change(
    nats_cluster: NatsCluster, nats_cluster_url: str, tmp_path: Path
) -> None:
    config = nats_test_config(nats_cluster_url, replicas=3)
    sink = NatsSink(config)
    await sink.connect()
    path = single.write_config(
        tmp_path,
        {
            "url": nats_cluster_url,
            "stream": config.stream,
            "subject_prefix": config.subject_prefix,
            "replicas": 3,
        },
        ["files"],
    )
    try:
        async with tail("--config", str(path)) as t:
            await t.wait_ready()
            await sink.publish("files", single.events("files", [(Added, "a")]))
            first = await t.line()
            leader = await asyncio.to_thread(nats_cluster.wait_stream_leader, config.stream)
            await asyncio.to_thread(kill, leader)
            later = single.events("files", [(Modified, "a")], 2)
            while True:  # as the bridge does: the same batch again until acknowledged
                try:
                    await sink.publish("files", later)
                    break
                except PublishError:
                    continue
            await asyncio.to_thread(leader.start)  # back with its store
            second = await t.line()
            code, _rest = await t.interrupt()
    finally:
        await sink.aclose()
        await asyncio.to_thread(nats_cluster.ensure_running)
        await asyncio.to_thread(nats_cluster.wait_stream_healthy, config.stream)
    assert code == 0
    assert first.split()[1:4] == ["added", "files", "a"]
    assert second.split()[1:4] == ["modified", "files", "a"]
