"""Clustered test servers: a 3-node NATS cluster, a Redis Cluster, a Redis Sentinel set.

::

    NatsCluster        3 NatsServer, routes on loopback, JetStream (R3 streams possible)
    RedisClusterSet    6 redis-server in cluster mode: 3 primaries + 3 replicas
    SentinelSet        1 primary + 1 replica redis-server, 3 sentinels watching ``mymaster``

Each node is a :class:`~tests.support.servers.ServerProcess` on its own free loopback port, so
a node is killed with ``node.stop()`` (or ``kill()`` here: SIGKILL, no goodbye) and brought
back with ``node.start()`` on the same address and data dir. The helpers wait for conditions
(cluster state, a new stream leader, a promoted replica), never for fixed times.

Settings the bridge's guarantees need are set here as the README's "Scaling" section asks for
production: Redis nodes keep an append-only file (``appendfsync everysec``; restarts keep the
data), and the sink's ``WAIT`` and leader election's (bridge/ha/replication.py) need one
replica to acknowledge, which each primary here has; ``cluster-node-timeout`` and
``down-after-milliseconds`` are short (1 s) so that failovers happen within a test.

Nothing here imports pytest; ``tests/conftest.py`` wraps these in session fixtures that start
only when a test asks for them.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.servers import (
    LOOPBACK,
    NatsServer,
    RedisServer,
    ServerError,
    ServerProcess,
    _resp,
    free_port,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "NatsCluster",
    "RedisClusterSet",
    "SentinelSet",
    "kill",
    "redis_command",
    "wait_until",
]

_TIMEOUT_S = 60.0
_POLL_S = 0.05
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = _TIMEOUT_S) -> None:
    """Poll ``condition`` until true; :class:`ServerError` naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(_POLL_S)


def kill(server: ServerProcess) -> None:
    """SIGKILL the server (no shutdown: an AOF loses what was not fsynced); keeps port and dir."""
    proc = server._proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    server.stop()


# -- raw RESP (no client library, so the fixtures work without redis-py) -------------------------


def redis_command(port: int, *parts: str, timeout_s: float = 2.0) -> Any:
    """Run one command on 127.0.0.1:``port``; the reply decoded (errors as :class:`ServerError`).

    Bulk strings come back as ``str``, arrays as lists, integers as ``int``.
    """
    import socket

    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
        sock.sendall(_resp(*parts))
        reader = sock.makefile("rb")
        return _read_reply(reader)


def _read_reply(reader: Any) -> Any:
    line: bytes = reader.readline()
    if not line:
        raise ServerError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise ServerError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ServerError(f"unexpected reply {line!r}")


def _answers(port: int, *parts: str) -> Any:
    try:
        return redis_command(port, *parts, timeout_s=1.0)
    except (OSError, ServerError):
        return None


# -- NATS ---------------------------------------------------------------------------------------


class _ClusterNatsServer(NatsServer):
    """A NATS node whose configuration file adds the cluster block (rewritten at each start)."""

    def __init__(self, *, cluster_port: int, routes: Sequence[int], cluster: str) -> None:
        route_list = ", ".join(f"nats-route://{LOOPBACK}:{p}" for p in routes)
        config = (
            f"cluster {{\n  name: {cluster}\n  listen: {LOOPBACK}:{cluster_port}\n"
            f"  routes: [{route_list}]\n}}\n"
        )
        super().__init__(config=config)
        self.cluster_port = cluster_port

    @property
    def server_name(self) -> str:
        return f"koprs-test-{self.port}"


class NatsCluster:
    """Three JetStream nodes in one cluster (``koprs-test``), routes between them on loopback.

    :attr:`url` lists all three, comma-separated, as ``broker.url`` takes it.
    """

    def __init__(self, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes: list[NatsServer] = [
            _ClusterNatsServer(
                cluster_port=port,
                routes=[p for p in cluster_ports if p != port],
                cluster="koprs-test",
            )
            for port in cluster_ports
        ]
        self.startup_s: float | None = None
        self.name = "nats-cluster"

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        started = time.monotonic()
        procs = [node for node in self.nodes if not node.running]
        for node in procs:  # launched together: each waits for its peers to elect a leader
            node.start()
        self.wait_healthy()
        self.startup_s = time.monotonic() - started

    def wait_healthy(self, timeout_s: float = _TIMEOUT_S) -> None:
        """Until every running node reports JetStream healthy with a meta leader."""
        wait_until(
            lambda: all(self._healthy(n) for n in self.nodes if n.running),
            "the NATS cluster to be healthy",
            timeout_s,
        )

    @staticmethod
    def _healthy(node: NatsServer) -> bool:
        jsz = _json(f"{node.monitor_url}/jsz")
        healthy = _json(f"{node.monitor_url}/healthz")
        return (
            jsz is not None
            and bool((jsz.get("meta_cluster") or {}).get("leader"))
            and healthy is not None
            and healthy.get("status") == "ok"
        )

    def node_named(self, name: str) -> NatsServer:
        for node in self.nodes:
            if f"koprs-test-{node.port}" == name:
                return node
        raise ServerError(f"no node named {name!r} in the cluster")

    def stream_info(self, stream: str) -> dict[str, Any] | None:
        """The stream's entry of ``/jsz?streams=true`` as its leader reports it (the other
        nodes' view of the replicas may lag), or another running node's if the leader's is
        not to be had."""
        seen: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            if not node.running:
                continue
            jsz = _json(f"{node.monitor_url}/jsz?streams=true&config=true")
            if jsz is None:
                continue
            for account in jsz.get("account_details") or []:
                for entry in account.get("stream_detail") or []:
                    if entry.get("name") == stream and entry.get("cluster", {}).get("leader"):
                        seen[f"koprs-test-{node.port}"] = entry
        for name, entry in seen.items():
            if entry["cluster"]["leader"] == name:
                return entry
        return next(iter(seen.values()), None)

    def stream_leader(self, stream: str) -> NatsServer | None:
        info = self.stream_info(stream)
        if info is None:
            return None
        leader = info.get("cluster", {}).get("leader")
        return self.node_named(leader) if leader else None

    def wait_stream_leader(self, stream: str, *, not_on: NatsServer | None = None) -> NatsServer:
        """The stream's leader once it has one (other than ``not_on``, when given)."""
        found: list[NatsServer] = []

        def elected() -> bool:
            leader = self.stream_leader(stream)
            if leader is None or leader is not_on or not leader.running:
                return False
            found.append(leader)
            return True

        wait_until(elected, f"a leader of stream {stream}")
        return found[-1]

    def wait_stream_healthy(self, stream: str) -> None:
        """Until the stream has a running leader that reports every replica on a running node
        current (its ``/jsz`` view)."""

        def healthy() -> bool:
            info = self.stream_info(stream)
            if info is None:
                return False
            cluster = info.get("cluster") or {}
            leader = cluster.get("leader")
            running = {f"koprs-test-{n.port}" for n in self.nodes if n.running}
            if leader not in running:
                return False
            replicas = [r for r in cluster.get("replicas") or [] if r.get("name") in running]
            return all(r.get("current") and not r.get("offline") for r in replicas)

        wait_until(healthy, f"stream {stream} healthy on every node")

    def wait_stream_current(self, stream: str, messages: int) -> None:
        """Until the stream's leader and every replica report ``messages`` messages."""

        last: list[object] = [None]

        def current() -> bool:
            info = self.stream_info(stream)
            last[0] = info and {"state": info.get("state"), "cluster": info.get("cluster")}
            if info is None or (info.get("state") or {}).get("messages") != messages:
                return False
            replicas = info.get("cluster", {}).get("replicas") or []
            return all(r.get("current") and not r.get("offline") for r in replicas)

        try:
            wait_until(current, f"stream {stream} with {messages} messages on every replica")
        except ServerError as exc:
            raise ServerError(f"{exc}; last seen: {last[0]}") from None

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def ensure_running(self) -> None:
        if not all(node.running for node in self.nodes):
            for node in self.nodes:
                node.resume()
                node.start()
            self.wait_healthy()


def _json(url: str) -> dict[str, Any] | None:
    try:
        with _http.open(url, timeout=1.0) as response:
            loaded: dict[str, Any] = json.loads(response.read())
            return loaded
    except (OSError, ValueError):
        return None


# -- Redis Cluster ------------------------------------------------------------------------------

_DURABLE = ("--appendonly", "yes", "--appendfsync", "everysec", "--repl-diskless-sync-delay", "0")


class _ClusterRedisServer(RedisServer):
    name = "redis-cluster"

    def __init__(self) -> None:
        super().__init__(
            extra_args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000",
                "--cluster-port", str(free_port()),  # else port + 10000, maybe above 65535
                *_DURABLE,
            ]
        )  # fmt: skip

    def _is_ready(self) -> bool:
        return bool(_answers(self.port, "PING") == "PONG")


class RedisClusterSet:
    """A Redis Cluster of 3 primaries and 3 replicas on loopback (``redis-cli --cluster create``).

    :attr:`url` is ``redis+cluster://`` with every node, as ``broker.url`` takes it.
    """

    def __init__(self, primaries: int = 3) -> None:
        self.nodes: list[RedisServer] = [_ClusterRedisServer() for _ in range(primaries * 2)]
        self.replicas_per_primary = 1
        self._created = False
        self.startup_s: float | None = None
        self.name = "redis-cluster"

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes) + "/"

    def start(self) -> None:
        started = time.monotonic()
        for node in self.nodes:
            node.start()
        if not self._created:
            command = [
                "redis-cli",
                "--cluster",
                "create",
                *(f"{LOOPBACK}:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas_per_primary),
                "--cluster-yes",
            ]
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                raise ServerError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
            self._created = True
        self.wait_healthy()
        self.startup_s = time.monotonic() - started

    def wait_healthy(self, timeout_s: float = _TIMEOUT_S) -> None:
        """Until every running node says ``cluster_state:ok`` and each slot range has a
        running primary that every running node agrees on."""

        def healthy() -> bool:
            views = set()
            for node in self.nodes:
                if not node.running:
                    continue
                info = _answers(node.port, "CLUSTER", "INFO")
                if not isinstance(info, str) or "cluster_state:ok" not in info:
                    return False
                views.add(tuple(sorted(self._primaries_seen_by(node) or ())))
                if not _is_primary(node.port) and not _replica_synced(node.port):
                    return False
            return len(views) == 1 and len(next(iter(views))) == len(self.nodes) // 2

        wait_until(healthy, "the Redis Cluster to be ok", timeout_s)

    def _primaries_seen_by(self, node: RedisServer) -> list[int] | None:
        slots = _answers(node.port, "CLUSTER", "SLOTS")
        if not isinstance(slots, list):
            return None
        ports = [int(entry[2][1]) for entry in slots]
        running = {n.port for n in self.nodes if n.running}
        return ports if all(p in running for p in ports) else None

    def node_at(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise ServerError(f"no cluster node on port {port}")

    def primary_for(self, key: str) -> RedisServer:
        """The running primary that owns ``key``'s slot now."""
        for node in self.nodes:
            if not node.running:
                continue
            slot = _answers(node.port, "CLUSTER", "KEYSLOT", key)
            slots = _answers(node.port, "CLUSTER", "SLOTS")
            if not isinstance(slot, int) or not isinstance(slots, list):
                continue
            for entry in slots:
                if int(entry[0]) <= slot <= int(entry[1]):
                    return self.node_at(int(entry[2][1]))
        raise ServerError(f"no primary found for key {key!r}")

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        info = _answers(primary.port, "INFO", "replication")
        if not isinstance(info, str):
            return []
        ports = []
        for line in info.splitlines():
            if line.startswith("slave") and "port=" in line:
                fields = dict(p.split("=", 1) for p in line.split(":", 1)[1].split(","))
                ports.append(int(fields["port"]))
        return [self.node_at(p) for p in ports]

    def fail_over(self, key: str) -> tuple[RedisServer, RedisServer]:
        """Kill the primary owning ``key``'s slot and wait until its replica took over.

        Returns (the killed primary, the promoted replica). The killed node stays down:
        bring it back with :meth:`restore`.
        """
        old = self.primary_for(key)
        kill(old)
        wait_until(lambda: self.primary_for(key) is not old, f"a new primary for {key!r}")
        self.wait_healthy()
        return old, self.primary_for(key)

    def restore(self) -> None:
        """Start every stopped node again (it rejoins as a replica) and wait until healthy."""
        for node in self.nodes:
            node.resume()
            node.start()
        self.wait_healthy()

    def flushall(self) -> None:
        for node in self.nodes:
            if node.running and _answers(node.port, "ROLE") and _is_primary(node.port):
                redis_command(node.port, "FLUSHALL")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def _replica_synced(port: int) -> bool:
    info = _answers(port, "INFO", "replication")
    return isinstance(info, str) and "master_link_status:up" in info


def _is_primary(port: int) -> bool:
    role = _answers(port, "ROLE")
    return isinstance(role, list) and role[0] == "master"


# -- Sentinel -----------------------------------------------------------------------------------


class _SentinelProcess(ServerProcess):
    """``redis-server <conf> --sentinel``; its configuration file is rewritten by the sentinel
    (the current primary, the other sentinels), so a restart remembers them."""

    name = "sentinel"

    def __init__(self, *, service: str, primary_port: int, quorum: int) -> None:
        super().__init__()
        self.config_path: Path = self.data_dir / "sentinel.conf"
        self.config_path.write_text(
            f"port {self.port}\nbind {LOOPBACK}\ndir {self.data_dir}\n"
            f"sentinel monitor {service} {LOOPBACK} {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} 1000\n"
            f"sentinel failover-timeout {service} 5000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    def _command(self) -> list[str]:
        return [RedisServer.binary(), str(self.config_path), "--sentinel"]

    def _is_ready(self) -> bool:
        return bool(_answers(self.port, "PING") == "PONG")


class SentinelSet:
    """A primary and a replica ``redis-server``, and 3 sentinels watching them as ``mymaster``.

    :attr:`url` is ``redis+sentinel://`` with the three sentinels and the service name.
    """

    service = "mymaster"

    def __init__(self) -> None:
        self.primary = RedisServer(extra_args=list(_DURABLE))
        self.replica = RedisServer(
            extra_args=[*_DURABLE, "--replicaof", LOOPBACK, str(self.primary.port)]
        )
        self.data_nodes: list[RedisServer] = [self.primary, self.replica]
        self.sentinels: list[ServerProcess] = [
            _SentinelProcess(service=self.service, primary_port=self.primary.port, quorum=2)
            for _ in range(3)
        ]
        self.startup_s: float | None = None
        self.name = "redis-sentinel"

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self) -> None:
        started = time.monotonic()
        for server in (*self.data_nodes, *self.sentinels):
            server.start()
        self.wait_healthy()
        self.startup_s = time.monotonic() - started

    def current_primary(self) -> RedisServer | None:
        """The data node every running sentinel names as primary, if they agree."""
        named = set()
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            addr = _answers(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            if not isinstance(addr, list):
                return None
            named.add(int(addr[1]))
        if len(named) != 1:
            return None
        port = named.pop()
        return next((n for n in self.data_nodes if n.port == port), None)

    def wait_healthy(self, timeout_s: float = _TIMEOUT_S) -> None:
        """Until the sentinels agree on a running primary that has a replica in sync, and each
        sentinel knows the others."""

        def healthy() -> bool:
            primary = self.current_primary()
            if primary is None or not primary.running or not _is_primary(primary.port):
                return False
            others = [n for n in self.data_nodes if n is not primary and n.running]
            if not all(_replica_synced(n.port) for n in others):
                return False
            for sentinel in self.sentinels:
                if not sentinel.running:
                    continue
                known = _answers(sentinel.port, "SENTINEL", "SENTINELS", self.service)
                if not isinstance(known, list) or len(known) < len(self.sentinels) - 1:
                    return False
            return True

        wait_until(healthy, "the Sentinel set to be healthy", timeout_s)

    def fail_over(self) -> tuple[RedisServer, RedisServer]:
        """Kill the current primary and wait until the sentinels promoted the replica.

        Returns (the killed primary, the new primary); the old one stays down until
        :meth:`restore`.
        """
        old = self.current_primary()
        if old is None:
            raise ServerError("the sentinels do not agree on a primary")
        kill(old)

        def promoted() -> bool:
            new = self.current_primary()
            return new is not None and new is not old and _is_primary(new.port)

        wait_until(promoted, "the sentinels to promote the replica")
        new = self.current_primary()
        assert new is not None
        return old, new

    def restore(self) -> None:
        """Start stopped nodes again and wait until healthy. A data node that comes back while
        another is primary is made its replica at once (``REPLICAOF``, what the sentinels
        would send it too, but only after their next ``INFO`` of it, up to ~10 s later)."""
        returning = [n for n in self.data_nodes if not n.running]
        for server in (*self.data_nodes, *self.sentinels):
            server.resume()
            server.start()
        primary = self.current_primary()
        for node in returning:
            if primary is not None and node is not primary and _is_primary(node.port):
                redis_command(node.port, "REPLICAOF", LOOPBACK, str(primary.port))
        self.wait_healthy()

    def flushall(self) -> None:
        primary = self.current_primary()
        if primary is not None:
            redis_command(primary.port, "FLUSHALL")

    def close(self) -> None:
        for server in (*self.sentinels, *self.data_nodes):
            server.close()


def stop_all(servers: Iterable[ServerProcess]) -> None:
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()
