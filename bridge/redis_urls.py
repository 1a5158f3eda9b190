"""Redis Cluster and Redis Sentinel URLs, and NATS server lists: parsed and checked, in words.

No client library is imported here (``koprs-bridge check`` and the config reader use it);
the clients themselves: :mod:`bridge.connections_redis`. URL forms::

    redis+cluster://[user:password@]host:port[,host:port...]/
    rediss+cluster://...                                      (TLS)
    redis+sentinel://[user:password@]host:port[,host:port...]/<service_name>[/<db>]
    rediss+sentinel://...                                     (TLS)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

from bridge.errors import ConfigError
from bridge.secrets import redact_url

__all__ = [
    "CLUSTER_SCHEMES",
    "REDIS_SCHEMES",
    "SENTINEL_SCHEMES",
    "RedisTarget",
    "check_nats_urls",
    "check_redis_url",
    "default_wait_replicas",
    "parse_redis_url",
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


def default_wait_replicas(url: str) -> int:
    """How many replicas leader election waits for by default (``WAIT``,
    :mod:`bridge.ha.replication`): 1 for a ``+cluster`` or ``+sentinel`` URL (there are
    replicas to lose a write to), 0 for a single server."""
    return 1 if url.partition("://")[0] in (*CLUSTER_SCHEMES, *SENTINEL_SCHEMES) else 0


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


def check_nats_urls(url: str) -> str | None:
    """What is wrong with a comma-separated NATS server list, in words; None when fine.

    Every entry needs a scheme of its own (``nats://`` or ``tls://``, as nats-py takes the
    list); a Redis URL among them is a mix-up.
    """
    for part in (p.strip() for p in url.split(",")):
        if not part:
            return "an empty entry in the server list (two commas, or one at the end)"
        scheme, sep, _ = part.partition("://")
        if not sep:
            return f"{redact_url(part)!r} has no scheme: write nats://{part} (every server)"
        if scheme.lower() not in ("nats", "tls"):
            return (
                f"mixed schemes: {scheme}:// in a NATS server list (every server must be "
                "nats:// or tls://)"
            )
    return None
