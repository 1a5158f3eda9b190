"""Writes of leader election and checkpoints that count only once replicas have them.

A Redis primary acknowledges a write before its replicas have it. On Redis Cluster or
Sentinel, a primary that dies in that moment is replaced by a replica without the write:

* a lease acquisition lost: another replica acquires the source too (two leaders until the
  first notices at its next heartbeat);
* a membership renewal lost: by the promoted replica's clock the membership ends up to one
  period earlier than by the holder's, which still publishes while another takes over;
* a checkpoint (intent or commit) lost: the new leader starts from an older revision and
  publishes changes again, under other ids.

So each of these scripts is followed, on the same connection and in the same round trip, by
``WAIT <replicas> <timeout>`` (``WAIT`` counts the replicas that acknowledged every write of
*its* connection, so it must be that one). The write counts only when at least ``replicas``
replicas acknowledged it; otherwise :class:`NotReplicated` (a
:class:`~bridge.errors.StateError`) says so, and the caller treats it like Redis being
unreachable: an acquisition is not used (taken again at the next round, with a new fence), a
renewal does not move the membership's deadline (all leases are lost when it passes), a
checkpoint write is retried. The write itself stays on the primary; whatever is retried is
idempotent or fenced.

``replicas`` comes from ``leader_election.wait_replicas`` (default: 1 on a
``redis+cluster://`` or ``redis+sentinel://`` URL, 0, no ``WAIT``, on a single server).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio
import redis.exceptions

from bridge.connections_redis import key_connection, topology_errors
from bridge.errors import StateError

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection
    from redis.commands.core import AsyncScript

__all__ = ["NotReplicated", "Replication"]

_ATTEMPTS = 2
"""A topology change (a failover, a moved slot) is tried once more, on the new primary."""


class NotReplicated(StateError):
    """A write reached the primary but fewer replicas than asked within the ``WAIT`` timeout."""


@dataclass(frozen=True)
class Replication:
    """How many replicas must acknowledge a write of leader election or checkpoints."""

    replicas: int = 0
    """``WAIT`` for this many replicas after each write; 0: no ``WAIT``."""
    timeout_s: float = 1.0
    """``WAIT``'s timeout (below the client's socket timeout, which bounds the read)."""

    async def run(
        self,
        client: redis.asyncio.Redis,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        what: str,
    ) -> Any:
        """``script`` with ``keys`` and ``args``; then, if replicas are asked for, ``WAIT``
        on the same connection: :class:`NotReplicated` naming ``what`` (the write, in words)
        when too few acknowledged it. Redis errors are raised as they are."""
        if self.replicas <= 0:
            return await script(keys=list(keys), args=list(args))
        retried: tuple[type[Exception], ...] = (
            *topology_errors(),
            redis.exceptions.ConnectionError,
        )
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with key_connection(client, keys[0].encode()) as conn:
                    return await self._run_and_wait(conn, script, keys, args, what)
            except retried:
                if attempt == _ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def _run_and_wait(
        self,
        conn: AbstractConnection,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        what: str,
    ) -> Any:
        wait = ("WAIT", self.replicas, max(1, round(self.timeout_s * 1000)))
        reply, acked = await _pair(conn, ("EVALSHA", script.sha, len(keys), *keys, *args), wait)
        if isinstance(reply, redis.exceptions.NoScriptError):  # a promoted replica, a restart
            reply, acked = await _pair(conn, ("EVAL", script.script, len(keys), *keys, *args), wait)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(acked, Exception):
            raise acked
        if not isinstance(acked, int) or acked < self.replicas:
            raise NotReplicated(
                f"{what}: written on the Redis primary, but acknowledged by {acked} of the "
                f"{self.replicas} replica(s) leader_election.wait_replicas asks for within "
                f"{wait[2]} ms (WAIT); not counted, as a failover now could lose it"
            )
        return reply


async def _pair(conn: AbstractConnection, *commands: tuple[Any, ...]) -> list[Any]:
    """Send ``commands`` in one round trip; their replies, an error reply as its exception
    (so every reply is read and the connection stays usable)."""
    await conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except redis.exceptions.ResponseError as exc:
            replies.append(exc)
    return replies
