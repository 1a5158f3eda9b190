"""Redis Cluster and Redis Sentinel URLs: parsing, checking, and the client each needs.

URL forms (the contract of ``broker.url``, ``leader_election.redis_url``,
``koprs-bridge tail --broker``, ``status`` and :func:`bridge.consumer.watch_redis`)::

    redis+cluster://[user:password@]host:port[,host:port...]/
    rediss+cluster://...                                      (TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/<service_name>[/<db>]
    rediss+sentinel://...                                     (TLS)

* Cluster: the hosts are startup nodes (any reachable one is enough; the client learns the
  others from ``CLUSTER SLOTS`` and follows ``MOVED``/``ASK`` redirections and failovers). A
  cluster has database 0 only, so the path must be empty or ``/``.
* Sentinel: the hosts are sentinels; the client asks them for the primary of
  ``<service_name>`` at every (re)connection, so it follows a failover to the promoted
  replica. ``<db>`` defaults to 0.
* Credentials (from the URL, or the ``auth`` section, which wins) and the ``tls`` section apply
  to the data nodes. Sentinels are reached with the same TLS settings (``rediss+sentinel://``)
  but without credentials: Sentinel's own ``requirepass`` is not supported.

:func:`check_redis_url` explains a wrong URL in words (for ``koprs-bridge check``);
:func:`clustered_client` builds the client; :func:`key_connection` hands out one raw
connection to the primary of a key's slot on any topology (the Redis sink runs its
transaction on it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import unquote

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

from bridge.errors import ConfigError
from bridge.secrets import redact_url

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from bridge.service.config import TlsConfig

__all__ = [
    "CLUSTER_SCHEMES",
    "REDIS_SCHEMES",
    "SENTINEL_SCHEMES",
    "ClusterUnavailable",
    "RedisTarget",
    "check_redis_url",
    "clustered_client",
    "is_cluster",
    "key_connection",
    "parse_redis_url",
    "topology_errors",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
REDIS_SCHEMES = ("redis", "rediss", *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)
"""Every scheme a Redis URL of the bridge may have (``unix://`` too, for the sink only)."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``redis+cluster://`` or ``redis+sentinel://`` URL."""

    topology: Literal["cluster", "sentinel"]
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    service: str | None = None
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a cluster or sentinel URL; :class:`ConfigError` says what is wrong."""
    problem = check_redis_url(url)
    if problem is not None:
        raise ConfigError(f"Redis URL {redact_url(url)!r}: {problem}")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    netloc, _, path = rest.partition("/")
    credentials, _, hostlist = netloc.rpartition("@")
    username = password = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    hosts = tuple(_host_port(part) for part in hostlist.split(","))
    if scheme in CLUSTER_SCHEMES:
        return RedisTarget(
            "cluster", scheme.startswith("rediss"), hosts, username=username, password=password
        )
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    return RedisTarget(
        "sentinel",
        scheme.startswith("rediss"),
        hosts,
        service=unquote(parts[0]),
        db=int(parts[1]) if len(parts) > 1 else 0,
        username=username,
        password=password,
    )


def _host_port(part: str) -> tuple[str, int]:
    host, _, port = part.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check_redis_url(url: str) -> str | None:
    """What is wrong with a Redis URL of any scheme, in words; None when it is fine."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in REDIS_SCHEMES:
        return (
            "must start with redis://, rediss://, redis+cluster://, rediss+cluster://, "
            "redis+sentinel:// or rediss+sentinel://"
        )
    netloc, _, path = rest.partition("/")
    hostlist = netloc.rpartition("@")[2]
    if "://" in rest:
        return (
            "mixed schemes: give the scheme once, then the hosts comma-separated "
            f"({scheme}://host1:port,host2:port/...)"
        )
    if scheme in ("redis", "rediss"):
        if "," in hostlist:
            return (
                "several hosts need a topology: redis+cluster://h1:p,h2:p/ for Redis Cluster, "
                "redis+sentinel://h1:p,h2:p/<service_name> for Sentinel"
            )
        return None
    if not hostlist:
        return "no host: list at least one host:port"
    for part in hostlist.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"{part.strip()!r} is not host:port (every host needs its port)"
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if scheme in CLUSTER_SCHEMES:
        if parts:
            return "a Redis Cluster has database 0 only: end the URL with the hosts and '/'"
        return None
    if not parts:
        return (
            "missing service name: redis+sentinel://host:port[,host:port]/<service_name>[/<db>] "
            "(the name the sentinels monitor, e.g. mymaster)"
        )
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        return "after the service name only a database number may follow (/<service_name>/<db>)"
    return None


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def topology_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "the topology changed, ask again": a failover in progress, a slot
    moved, a node that is a replica now."""
    return (
        redis.exceptions.MovedError,
        redis.exceptions.AskError,
        redis.exceptions.ClusterDownError,
        redis.exceptions.TryAgainError,
        redis.exceptions.ReadOnlyError,
        redis.exceptions.MasterDownError,
        redis.exceptions.SlotNotCoveredError,
    )


def clustered_client(
    url: str,
    tls: TlsConfig | None,
    credentials: Any,
    options: dict[str, Any],
) -> redis.asyncio.Redis:
    """The client of a ``+cluster`` or ``+sentinel`` URL.

    ``credentials``: a redis-py ``CredentialProvider`` (None: the URL's user and password);
    ``options``: the keyword arguments :func:`bridge.connections.redis_client` got (timeouts,
    ``retry``). A :class:`~redis.asyncio.cluster.RedisCluster` is not a subclass of
    ``redis.asyncio.Redis`` but offers the same commands: it is returned as one.
    """
    from bridge.connections import TlsConnection, _Credentials  # the TLS context of the bridge

    target = parse_redis_url(url)
    use_tls = target.tls or tls is not None
    if credentials is None and target.password is not None:
        credentials = _Credentials(target.username, target.password)
    auth: dict[str, Any] = {}
    if credentials is not None:
        auth["credential_provider"] = credentials
    elif target.username:
        auth["username"] = target.username
    options = dict(options)
    if target.topology == "cluster":
        retry = options.pop("retry", None)
        kwargs: dict[str, Any] = {**auth, **options}
        kwargs.pop("driver_info", None)
        kwargs.pop("lib_name", None)
        kwargs.pop("lib_version", None)
        node_kwargs: dict[str, Any] = {}
        if use_tls:
            node_kwargs = {"connection_class": TlsConnection, "tls_config": tls}
        client = _Cluster(
            startup_nodes=[ClusterNode(h, p, **node_kwargs) for h, p in target.hosts],
            retry=retry,
            driver_info=None,
            **kwargs,
        )
        if use_tls:  # nodes learnt later are made with the same connection class
            client.nodes_manager.connection_kwargs.update(node_kwargs)
        return cast("redis.asyncio.Redis", client)
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in options.items() if k.startswith("socket_")}
    data_kwargs: dict[str, Any] = {**auth, **options}
    if use_tls:
        data_kwargs["connection_class"] = TlsSentinelConnection
        data_kwargs["tls_config"] = tls
        sentinel_kwargs["connection_class"] = TlsConnection
        sentinel_kwargs["tls_config"] = tls
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.hosts), sentinel_kwargs=sentinel_kwargs, **data_kwargs
    )
    assert target.service is not None
    primary = cast(
        "_SentinelPrimary",
        sentinel.master_for(target.service, redis_class=_SentinelPrimary, db=target.db),
    )
    primary.sentinels = sentinel
    return primary


class _SentinelPrimary(redis.asyncio.Redis):
    """The client of a Sentinel-named primary; closing it closes the sentinel clients too."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinels is not None:
                for client in self.sentinels.sentinels:
                    await client.aclose()


class ClusterUnavailable(redis.exceptions.ConnectionError):
    """No node of the Redis Cluster answered (redis-py raises ``RedisClusterException``, which
    is no ``RedisError``: the bridge's retry loops treat this like any lost connection)."""


class _Cluster(RedisCluster):
    """redis-py's cluster client, its "no node reachable" errors as :class:`ClusterUnavailable`."""

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            if isinstance(exc, redis.exceptions.RedisError):
                raise
            raise ClusterUnavailable(str(exc)) from exc


class TlsSentinelConnection(SentinelManagedConnection):
    """A connection to the primary a Sentinel names, over TLS with the bridge's context."""

    def __init__(self, *, tls_config: TlsConfig | None = None, **kwargs: Any) -> None:
        self.tls_config = tls_config
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def _connection_arguments(self) -> Any:
        from bridge.connections import ssl_context

        arguments = dict(super()._connection_arguments())
        arguments["ssl"] = ssl_context(self.tls_config)
        if self.tls_config is not None and self.tls_config.server_name:
            arguments["server_hostname"] = self.tls_config.server_name
        return arguments


@contextlib.asynccontextmanager
async def key_connection(
    client: redis.asyncio.Redis, key: bytes
) -> AsyncIterator[AbstractConnection]:
    """One raw connection to the primary owning ``key`` (single server, Sentinel or Cluster).

    The connection's state is unknown after an error: it is then disconnected (never handed
    out half-used), and on a Cluster a topology error (a failover, a moved slot) or a dead
    node makes the client read the slot table again before the next use.
    """
    if isinstance(client, RedisCluster):
        cluster: RedisCluster = client
        try:
            if not cluster.nodes_manager.slots_cache:
                # the first use (initialize() also runs the client's setup), or after an error
                await (
                    cluster.initialize()
                    if cluster._initialize
                    else cluster.nodes_manager.initialize()
                )
        except redis.exceptions.RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc
        try:
            node = cluster.get_node_from_key(key)
        except redis.exceptions.RedisClusterException as exc:  # the slot has no node now
            cluster.nodes_manager.slots_cache.clear()
            raise ClusterUnavailable(str(exc)) from exc
        conn: AbstractConnection = node.acquire_connection()
        try:
            yield conn
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if isinstance(exc, (*topology_errors(), redis.exceptions.ConnectionError, OSError)):
                cluster.nodes_manager.slots_cache.clear()  # read CLUSTER SLOTS again
                with contextlib.suppress(
                    redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError
                ):
                    await cluster.nodes_manager.initialize()
            raise
        finally:
            node.release(conn)
        return
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        yield conn
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
