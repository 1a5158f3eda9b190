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
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

from bridge.redis_urls import (
    CLUSTER_SCHEMES,
    REDIS_SCHEMES,
    SENTINEL_SCHEMES,
    RedisTarget,
    check_nats_urls,
    check_redis_url,
    parse_redis_url,
)

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection, Connection

    from bridge.connection_settings import TlsConfig

__all__ = [
    "CLUSTER_SCHEMES",
    "REDIS_SCHEMES",
    "SENTINEL_SCHEMES",
    "ClusterUnavailable",
    "RedisTarget",
    "check_nats_urls",
    "check_redis_url",
    "clustered_client",
    "is_cluster",
    "key_connection",
    "parse_redis_url",
    "topology_errors",
]


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
    *,
    tls_connection: type[Connection],
    tls_sentinel_connection: type[SentinelManagedConnection],
) -> redis.asyncio.Redis:
    """The client of a ``+cluster`` or ``+sentinel`` URL.

    ``credentials``: a redis-py ``CredentialProvider`` (None: none, or the URL's username
    alone); ``options``: the keyword arguments :func:`bridge.connections.redis_client` got
    (timeouts, ``retry``); ``tls_connection`` / ``tls_sentinel_connection``: the connection
    classes with the bridge's TLS context (:mod:`bridge.connections`). A
    :class:`~redis.asyncio.cluster.RedisCluster` is not a subclass of ``redis.asyncio.Redis``
    but offers the same commands: it is returned as one.
    """
    target = parse_redis_url(url)
    use_tls = target.tls or tls is not None
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
            node_kwargs = {"connection_class": tls_connection, "tls_config": tls}
        client = _Cluster(
            startup_nodes=[ClusterNode(h, p, **node_kwargs) for h, p in target.hosts],
            retry=retry,
            driver_info=None,
            **kwargs,
        )
        if use_tls:  # the startup nodes (redis-py rebuilds them) and the nodes learnt later
            client.nodes_manager.connection_kwargs.update(node_kwargs)
            for node in client.nodes_manager.startup_nodes.values():
                node.connection_class = tls_connection
                node.connection_kwargs["tls_config"] = tls
        return cast("redis.asyncio.Redis", client)
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in options.items() if k.startswith("socket_")}
    data_kwargs: dict[str, Any] = {**auth, **options}
    if use_tls:
        data_kwargs["connection_class"] = tls_sentinel_connection
        data_kwargs["tls_config"] = tls
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        list(target.hosts), sentinel_kwargs=sentinel_kwargs, **data_kwargs
    )
    if use_tls:  # the sentinels over TLS too (redis.asyncio.Redis takes no connection class)
        sentinel.sentinels = [
            redis.asyncio.Redis.from_pool(
                ConnectionPool(
                    host=host,
                    port=port,
                    connection_class=tls_connection,
                    tls_config=tls,
                    **sentinel_kwargs,
                )
            )
            for host, port in target.hosts
        ]
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

    closed = False

    async def aclose(self) -> None:
        self.closed = True  # no command may connect again (redis-py would re-initialize)
        await super().aclose()

    def _check_open(self) -> None:
        if self.closed:
            raise ClusterUnavailable("the Redis Cluster client is closed")

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        self._check_open()
        try:
            return await super().initialize(*args, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._check_open()
        try:
            return await super().execute_command(*args, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            if isinstance(exc, redis.exceptions.RedisError):
                raise
            raise ClusterUnavailable(str(exc)) from exc


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
