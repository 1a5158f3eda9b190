"""What a JetStream stream holds of a source, for :mod:`bridge.state.recovery`.

One ephemeral push consumer over ``<prefix>.<source>.>`` with ``DeliverPolicy.LAST_PER_SUBJECT``
and ``headers_only`` (no acknowledgements, flow control, in memory): the server sends the last
message of every item subject, headers only, so 100,000 items cost about 100,000 small messages
whatever the events' size. The read ends with the message that reports nothing pending after it
(or, when messages were deleted meanwhile, at the first idle heartbeat after the last one); the
consumer is then deleted (it also expires by itself ``inactive_threshold`` after the read).

From each message: the item key (the subject token when it decodes, else ``ce-subject``), and
the ``koprs-kind``, ``koprs-version`` and ``koprs-revision`` headers. A message without them
(published by a version that did not send them) is live unless its ``ce-type`` says removed,
with an unknown version.

The stream's limits are checked first: ``max_age``, ``max_msgs`` and ``max_bytes`` drop the last
message of an item that did not change for long, so the read may lack items (a warning says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from bridge.cloudevents import KIND_HEADER, REVISION_HEADER, VERSION_HEADER, header_value
from bridge.state.recovery import UNKNOWN_VERSION, Published
from bridge.subjects import decode_item_token

__all__ = ["limit_warnings", "read_published"]

log = logging.getLogger(__name__)

IDLE_HEARTBEAT_S = 1.0
INACTIVE_THRESHOLD_S = 60.0
_REMOVED_TYPE = "dev.koprs.external.removed.v1"


def limit_warnings(config: StreamConfig) -> list[str]:
    """Why this stream may not hold the last message of every item (empty: it does)."""
    name = config.name
    warnings = []
    if config.max_age:
        warnings.append(
            f"stream {name} has max_age {config.max_age:g} s: an item unchanged for longer has "
            "no message left (consumers do not list it, a restart without a checkpoint "
            "announces it again, and its deletion is not published)"
        )
    for limit in ("max_msgs", "max_bytes"):
        value = getattr(config, limit)
        if value is not None and value > 0:
            warnings.append(
                f"stream {name} has {limit} {value}: when reached, the oldest messages go, "
                "the last one of long-unchanged items included"
            )
    if config.max_msgs_per_subject == 0:  # 0 is refused by the server; -1 is unlimited
        warnings.append(f"stream {name} keeps no message per subject")
    return warnings


async def read_published(
    nc: Client,
    js: JetStreamContext,
    stream: str,
    subject_prefix: str,
    source_name: str,
    *,
    timeout_s: float,
) -> Published:
    """Read the last message of every item of ``source_name`` (see the module docstring);
    TimeoutError when ``timeout_s`` pass without a message."""
    published = Published()
    info = await js.stream_info(stream)
    published.warnings = limit_warnings(info.config)
    prefix = f"{subject_prefix}.{source_name}."
    inbox = nc.new_inbox()
    done = asyncio.Event()
    state = {"seen": 0, "last": False}

    async def on_message(msg: Msg) -> None:
        headers = msg.headers or {}
        reply = msg.reply or ""
        if not reply.startswith("$JS.ACK."):
            if headers.get("Status") == "100":
                if reply:  # a flow control request
                    await nc.publish(reply, b"")
                elif stalled := headers.get("Nats-Consumer-Stalled"):
                    await nc.publish(stalled, b"")
                elif state["seen"] and not state["last"]:
                    done.set()  # idle: what was pending at the start was deleted meanwhile
            return
        state["seen"] += 1
        _take(published, msg.subject, headers, prefix)
        if msg.metadata.num_pending == 0:
            state["last"] = True
            done.set()

    sub = await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=-1, pending_bytes_limit=-1)
    consumer: str | None = None
    try:
        created = await js.add_consumer(
            stream,
            ConsumerConfig(
                deliver_subject=inbox,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                filter_subject=f"{prefix}>",
                ack_policy=AckPolicy.NONE,
                headers_only=True,
                flow_control=True,
                idle_heartbeat=IDLE_HEARTBEAT_S,
                inactive_threshold=INACTIVE_THRESHOLD_S,
                mem_storage=True,
                num_replicas=1,
                max_deliver=1,
            ),
        )
        consumer = created.name
        while created.num_pending and not done.is_set():
            before = state["seen"]
            try:  # a bound on silence, not on the whole read (a million items take a while)
                await asyncio.wait_for(done.wait(), timeout_s)
            except TimeoutError:
                if state["seen"] == before:
                    raise
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await sub.unsubscribe()
        if consumer is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, OSError):
                await js.delete_consumer(stream, consumer)
    published.read = state["seen"]
    log.debug("read %d last messages of %s* in %s", published.read, prefix, stream)
    return published


def _take(published: Published, subject: str, headers: dict[str, str], prefix: str) -> None:
    """Record one item's last message."""
    token = subject[len(prefix) :] if subject.startswith(prefix) else ""
    key = decode_item_token(token) if token else None
    try:
        if key is None and "ce-subject" in headers:
            key = header_value(headers["ce-subject"])
        version = headers.get(VERSION_HEADER)
        kind = headers.get(KIND_HEADER)
        revision = headers.get(REVISION_HEADER)
        if revision is not None:
            number = int(revision)
            if published.revision is None or number > published.revision:
                published.revision = number
        if version is not None:
            version = header_value(version)
    except ValueError:
        version = kind = None
    if kind is None:
        kind = "removed" if headers.get("ce-type") == _REMOVED_TYPE else None
        version = None
    if kind == "removed":
        return
    if key is None:
        published.unreadable += 1
        return
    if version is None:
        published.unreadable += 1
        version = UNKNOWN_VERSION
    published.items[key] = version
