"""What ``koprs-bridge tail --stats`` and ``tail --dead-letters`` show: the consumers of a broker
(NATS durable consumers, Redis consumer groups) with their lag, and the dead letters.

``--stats`` prints one snapshot and exits. NATS: every consumer of the stream with its pending
messages (not yet delivered), unacknowledged ones, redelivered ones, acknowledgement floor and
last activity, and the number of dead letters. Redis: per source stream, every group with its
consumers, pending entries (delivered, not acknowledged), lag (entries not yet delivered; ``?``
when the server cannot tell) and last delivered id, and the length of the source's dead-letter
stream. ``--json`` prints the same as one JSON object.

``--dead-letters`` follows the dead letters (from the oldest kept), one line each: time, source,
key, deliveries, consumer, error (``--json``: one object each).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, TextIO

from bridge.consumer.dead_letters import (
    DeadLetter,
    nats_dead_letter_prefix,
    nats_dead_letter_stream,
    read_nats_dead_letter,
    read_redis_dead_letter,
    redis_dead_letter_prefix,
)
from bridge.subjects import REDIS_STREAM_PREFIX, redis_stream_key

__all__ = [
    "follow_nats_dead_letters",
    "follow_redis_dead_letters",
    "format_dead_letter",
    "format_stats",
    "nats_stats",
    "redis_stats",
]


async def nats_stats(js: Any, stream: str) -> dict[str, Any]:
    """The consumers of ``stream`` and its dead letters."""
    import nats.js.errors

    info = await js.stream_info(stream)
    consumers = []
    for consumer in await js.consumers_info(stream):
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        consumers.append(
            {
                "name": consumer.name,
                "durable": bool(consumer.config.durable_name),
                "pending": consumer.num_pending,
                "unacknowledged": consumer.num_ack_pending,
                "redelivered": consumer.num_redelivered,
                "ack_floor": floor,
                "lag": consumer.num_pending + consumer.num_ack_pending,
            }
        )
    dead_stream = nats_dead_letter_stream(stream)
    try:
        dead = (await js.stream_info(dead_stream)).state.messages
    except nats.js.errors.NotFoundError:
        dead = 0
    return {
        "broker": "nats",
        "stream": stream,
        "messages": info.state.messages,
        "last_sequence": info.state.last_seq,
        "consumers": sorted(consumers, key=lambda c: str(c["name"])),
        "dead_letters": {"stream": dead_stream, "count": dead},
    }


async def redis_stats(
    client: Any, sources: Sequence[str], prefix: str = REDIS_STREAM_PREFIX
) -> dict[str, Any]:
    """Per source: its stream, groups and dead letters."""
    out = []
    dead_prefix = redis_dead_letter_prefix(prefix)
    for source in sources:
        key = redis_stream_key(source, prefix)
        if await client.type(key) not in (b"stream", "stream"):
            continue
        info = await client.xinfo_stream(key)
        groups = []
        for group in await client.xinfo_groups(key):
            lag = group.get("lag")
            groups.append(
                {
                    "name": _text(group["name"]),
                    "consumers": int(group["consumers"]),
                    "pending": int(group["pending"]),
                    "lag": None if lag is None else int(lag),
                    "last_delivered": _text(group["last-delivered-id"]),
                }
            )
        dead_key = f"{dead_prefix}{source}"
        out.append(
            {
                "source": source,
                "stream": key,
                "entries": int(info["length"]),
                "last_id": _text(info["last-generated-id"]),
                "groups": sorted(groups, key=lambda g: str(g["name"])),
                "dead_letters": {"stream": dead_key, "count": int(await client.xlen(dead_key))},
            }
        )
    return {"broker": "redis", "sources": out}


def format_stats(stats: dict[str, Any], *, as_json: bool) -> str:
    """The ``--stats`` output (see the module docstring)."""
    if as_json:
        return json.dumps(stats, ensure_ascii=False)
    lines: list[str] = []
    if stats["broker"] == "nats":
        lines.append(
            f"stream {stats['stream']}: {stats['messages']} messages, last sequence "
            f"{stats['last_sequence']}"
        )
        rows = [["consumer", "pending", "unacked", "redelivered", "ack floor"]]
        rows += [
            [
                c["name"] + ("" if c["durable"] else " (ephemeral)"),
                str(c["pending"]),
                str(c["unacknowledged"]),
                str(c["redelivered"]),
                str(c["ack_floor"]),
            ]
            for c in stats["consumers"]
        ]
        lines += _table(rows)
        dead = stats["dead_letters"]
        lines.append(f"dead letters: {dead['count']} (stream {dead['stream']})")
        return "\n".join(lines)
    for source in stats["sources"]:
        lines.append(
            f"source {source['source']} ({source['stream']}): {source['entries']} entries, "
            f"last {source['last_id']}"
        )
        rows = [["group", "consumers", "pending", "lag", "last delivered"]]
        rows += [
            [
                g["name"],
                str(g["consumers"]),
                str(g["pending"]),
                "?" if g["lag"] is None else str(g["lag"]),
                g["last_delivered"],
            ]
            for g in source["groups"]
        ]
        lines += _table(rows)
        dead = source["dead_letters"]
        lines.append(f"dead letters: {dead['count']} ({dead['stream']})")
    return "\n".join(lines) if lines else "no koprs stream found"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def format_dead_letter(letter: DeadLetter, *, as_json: bool) -> str:
    """One dead letter as a line."""
    env = letter.envelope
    if as_json:
        return json.dumps(
            {
                "time": letter.time,
                "source_name": env.source_name if env else None,
                "key": env.key if env else None,
                "id": env.id if env else None,
                "kind": env.kind if env else None,
                "deliveries": letter.deliveries,
                "consumer": letter.consumer,
                "origin": letter.origin,
                "error": letter.error,
            },
            ensure_ascii=False,
        )
    what = f"{env.source_name} {json.dumps(env.key, ensure_ascii=False)}" if env else "?"
    return (
        f"{letter.time}  dead-letter  {what}  deliveries={letter.deliveries}  "
        f"consumer={letter.consumer}  origin={letter.origin}  error={letter.error}"
    )


async def follow_nats_dead_letters(
    js: Any, stream: str, subject_prefix: str, out: TextIO, *, as_json: bool
) -> None:
    """Print the dead letters of ``stream`` (oldest first), then new ones, until cancelled."""
    import nats.errors
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    dead_stream = nats_dead_letter_stream(stream)
    prefix = nats_dead_letter_prefix(subject_prefix)
    while True:
        try:
            sub = await js.pull_subscribe(
                f"{prefix}.>",
                stream=dead_stream,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=60.0,
                ),
            )
            break
        except nats.js.errors.NotFoundError:
            await asyncio.sleep(1.0)  # no dead letter yet: the stream is made with the first
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                letter = read_nats_dead_letter(
                    msg.subject, msg.headers, msg.data, prefix=prefix,
                    position=str(msg.metadata.sequence.stream),
                )  # fmt: skip
                out.write(format_dead_letter(letter, as_json=as_json) + "\n")
            out.flush()
    finally:
        await sub.unsubscribe()


async def follow_redis_dead_letters(
    client: Any,
    sources: Sequence[str],
    out: TextIO,
    *,
    as_json: bool,
    prefix: str = REDIS_STREAM_PREFIX,
) -> None:
    """Print the dead letters of ``sources`` (oldest first), then new ones, until cancelled."""
    dead_prefix = redis_dead_letter_prefix(prefix)
    cursors = {f"{dead_prefix}{source}": "0-0" for source in sources}
    while True:
        reply = await client.xread(cursors, count=100, block=1000)
        for stream, entries in reply or []:
            key = _text(stream)
            for entry_id, fields in entries:
                cursors[key] = _text(entry_id)
                letter = read_redis_dead_letter(
                    key, fields, prefix=dead_prefix, position=_text(entry_id)
                )
                out.write(format_dead_letter(letter, as_json=as_json) + "\n")
        out.flush()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
