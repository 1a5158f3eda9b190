"""Every Redis key of leader election and checkpoints, in one place.

The keys of one source share the hash tag ``{<source>}``, so on Redis Cluster they live in one
slot and the fenced scripts that touch several of them work unchanged::

    koprs:bridge:{S}:lease    the lease: "<replica-id>|<fence>", alive while its holder's
                              membership is (or, taken alone, by its own PX TTL)
    koprs:bridge:{S}:fence    fencing counter, INCR on every acquisition
    koprs:bridge:{S}:state    hash: the source's state map (object path -> ETag, HTTP validators)
    koprs:bridge:{S}:meta     hash: format version, revision, fence of the last commit
    koprs:bridge:{S}:intent   the batch being published (JSON), until its commit
    koprs:bridge:replicas     sorted set: replica id -> membership expiry (ms since the epoch)

The scripts of leader election also touch the replicas key together with the lease keys of
many sources (one heartbeat renews them all): on Redis Cluster every key must be in one slot,
so there the prefix itself is the hash tag (:func:`prefix_for`): ``{koprs:bridge}:{S}:lease``
and ``{koprs:bridge}:replicas`` all hash to the slot of ``koprs:bridge`` (the first ``{...}``
of a key decides). The election and checkpoints then live on one primary (the event streams
stay spread over the cluster), and every script stays atomic: no lease held by two replicas.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_PREFIX",
    "SourceKeys",
    "as_text",
    "prefix_for",
    "replicas_key",
]

DEFAULT_PREFIX = "koprs:bridge:"
CHECKPOINT_FORMAT = "1"


class SourceKeys:
    """The keys of one source."""

    __slots__ = ("fence", "intent", "lease", "meta", "source", "state")

    def __init__(self, source: str, prefix: str = DEFAULT_PREFIX) -> None:
        base = f"{prefix}{{{source}}}:"
        self.source = source
        self.lease = base + "lease"
        self.fence = base + "fence"
        self.state = base + "state"
        self.meta = base + "meta"
        self.intent = base + "intent"


def prefix_for(client: object, prefix: str = DEFAULT_PREFIX) -> str:
    """``prefix`` as the keys on ``client`` need it: on a Redis Cluster client, the prefix as
    one hash tag (``koprs:bridge:`` -> ``{koprs:bridge}:``), so that all election keys share
    a slot; unchanged elsewhere, or when it has braces already."""
    from redis.asyncio.cluster import RedisCluster

    if not isinstance(client, RedisCluster) or "{" in prefix:
        return prefix
    return f"{{{prefix.rstrip(':')}}}:"


def replicas_key(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}replicas"


def as_text(value: object) -> str:
    """A Redis reply (bytes, or str with decode_responses) as text."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
