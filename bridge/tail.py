"""``koprs-bridge tail``: follow a broker from the terminal, one line per event.

``koprs-bridge tail --config bridge.yaml`` follows every source of the config on its broker;
``--broker URL`` follows a broker directly (NATS: every subject under the prefix; Redis: the
``koprs:external:*`` streams that exist when it starts), ``--source NAME`` (repeatable) narrows
it down. Lines look like::

    2026-01-02T03:04:05.123456Z added    files  configs/app.yaml  size=120 etag=18c3...-78
    2026-01-02T03:04:09.000001Z modified web    https://cfg.example/app.json  status=200 ...

Keys with blanks or control characters are printed JSON-quoted. ``--json`` prints one JSON
object per event instead: ``time``, ``kind``, ``source_name``, ``key``, ``id``, ``type``,
``source``, ``dataschema``, ``initial`` and ``resource`` (the decoded resource; an HTTP body as
text, or base64 when it is not UTF-8). ``kind`` is always the kind of ``type``, the event as
published.

Without ``--from-start`` only changes published after the start are shown. With it, first the
current state of every item (list-then-watch: one line per live item, its latest event, marked
``(initial)``, ``"initial": true`` in JSON: ``modified`` for an item whose latest event was a
modification, though the watch delivers it as ``Added``), then a ``synced`` line
(``{"synced": [...sources]}`` with ``--json``), then live changes. Nothing is durable:
tailing never disturbs other consumers. NATS is read with
:func:`~bridge.consumer.nats.watch_nats` (an ephemeral consumer, deleted on exit; the stream is
the config's, or the one that captures the subject prefix), Redis with
:func:`~bridge.consumer.redis.watch_redis` (no group). Events that do not decode are logged on
stderr and skipped. Status messages go to stderr (``following ...`` once the subscription is in
place); Ctrl-C (SIGINT) or SIGTERM ends it with exit status 0.

``--stats`` prints the consumers (NATS durable consumers, Redis groups) with their lag and the
dead-letter counts once and exits; ``--dead-letters`` follows the dead letters instead of the
events (see :mod:`bridge.consumer.inspection`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

from bridge.aio import stop_on_signals, stop_with_grace
from bridge.connection_settings import AuthConfig, TlsConfig
from bridge.connections import describe_error, redis_client, redis_session
from bridge.consumer.base import Synced, Watch
from bridge.consumer.decoding import CustomResource, Envelope
from bridge.errors import BridgeError, ConfigError
from bridge.jsonable import jsonable
from bridge.redis_urls import REDIS_SCHEMES, check_nats_urls, check_redis_url
from bridge.secrets import redact_url
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject
from bridge.subjects import DEFAULT_SUBJECT_PREFIX, REDIS_STREAM_PREFIX, validate_source_name

__all__ = ["TailOptions", "format_json", "format_line", "run_tail"]

_SCHEMES = {"nats": "nats", "tls": "nats", **dict.fromkeys(REDIS_SCHEMES, "redis")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TailOptions:
    """What to follow and how to print it."""

    url: str
    kind: Literal["nats", "redis"]
    sources: tuple[str, ...] = ()
    """Source names; empty: every source."""
    as_json: bool = False
    from_start: bool = False
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    stream: str | None = None
    """NATS: the JetStream stream; None: the one that captures ``<subject_prefix>.>``."""
    tls: TlsConfig | None = None
    """TLS settings of the broker connection (from the config's ``broker.tls``)."""
    auth: AuthConfig | None = None
    """Credentials of the broker connection (from the config's ``broker.auth``)."""
    stats: bool = False
    """Print the consumers and their lag once, then exit."""
    dead_letters: bool = False
    """Follow the dead letters instead of the events."""

    @classmethod
    def from_args(
        cls,
        *,
        config: Path | None,
        broker: str | None,
        sources: Sequence[str],
        as_json: bool,
        from_start: bool,
        subject_prefix: str | None,
        stats: bool = False,
        dead_letters: bool = False,
    ) -> TailOptions:
        """Options from the command line (``--config`` or ``--broker``); ConfigError if wrong."""
        for name in sources:
            try:
                validate_source_name(name)
            except ValueError as exc:
                raise ConfigError(f"--source: {exc}") from None
        if config is not None:
            from bridge.service.config import load_config

            loaded = load_config(config)
            return cls(
                url=loaded.broker.url.reveal(),
                kind=loaded.broker.kind,
                sources=tuple(sources) or tuple(s.name for s in loaded.sources),
                as_json=as_json,
                from_start=from_start,
                subject_prefix=subject_prefix or loaded.broker.subject_prefix,
                stream=loaded.broker.stream,
                tls=loaded.broker.tls,
                auth=loaded.broker.auth,
                stats=stats,
                dead_letters=dead_letters,
            )
        assert broker is not None
        scheme = urlsplit(broker).scheme.lower()
        if scheme not in _SCHEMES:
            raise ConfigError(
                f"--broker must start with nats://, tls://, redis://, rediss://, "
                f"redis+cluster:// or redis+sentinel:// (or rediss+...), got {redact_url(broker)!r}"
            )
        kind: Literal["nats", "redis"] = "nats" if _SCHEMES[scheme] == "nats" else "redis"
        problem = check_redis_url(broker) if kind == "redis" else check_nats_urls(broker)
        if problem:
            raise ConfigError(f"--broker: {problem} (got {redact_url(broker)!r})")
        return cls(
            url=broker,
            kind=kind,
            sources=tuple(sources),
            as_json=as_json,
            from_start=from_start,
            subject_prefix=subject_prefix or DEFAULT_SUBJECT_PREFIX,
            stats=stats,
            dead_letters=dead_letters,
        )


# -- formatting ---------------------------------------------------------------------------------


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _quoted(key: str) -> str:
    if key and key.isprintable() and " " not in key and not key.startswith('"'):
        return key
    return json.dumps(key, ensure_ascii=False)


def _details(resource: Any) -> str:
    if isinstance(resource, StoredObject):
        size = "" if resource.size is None else f"size={resource.size} "
        return f"{size}etag={resource.etag}"
    if isinstance(resource, HttpResource):
        digest = resource.digest[:16]
        return f"status={resource.status} size={len(resource.body)} digest=sha256:{digest}"
    if isinstance(resource, CustomResource):
        return f"version={resource.version}"
    return ""


def _kind(envelope: Envelope) -> str:
    """The kind the event was published with (from its ``type``): a watch delivers an item of
    its initial list as ``Added`` whatever its latest event was; tail shows that event."""
    published = envelope.type.split(".")[-2:-1]  # dev.koprs.external.<kind>.v1, as decoded
    return published[0] if published else envelope.kind


def format_line(envelope: Envelope, *, initial: bool = False) -> str:
    """The readable line of one event."""
    parts = [
        _time(envelope.time),
        f"{_kind(envelope):<8}",
        envelope.source_name or envelope.source,
        _quoted(envelope.key),
    ]
    details = _details(envelope.event.resource)
    if details:
        parts.append(details)
    if initial:
        parts.append("(initial)")
    return "  ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, HttpResource):
        body: dict[str, str]
        try:
            body = {"encoding": "utf-8", "data": value.body.decode("utf-8")}
        except UnicodeDecodeError:
            body = {"encoding": "base64", "data": base64.b64encode(value.body).decode("ascii")}
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {**fields, "body": body, "size": len(value.body)}
    return jsonable(value)


def format_json(envelope: Envelope, *, initial: bool = False) -> str:
    """The JSON line of one event (see the module docstring)."""
    return json.dumps(
        {
            "time": _time(envelope.time),
            "kind": _kind(envelope),
            "source_name": envelope.source_name,
            "key": envelope.key,
            "id": envelope.id,
            "type": envelope.type,
            "source": envelope.source,
            "dataschema": envelope.dataschema,
            "initial": initial,
            "resource": _jsonable(envelope.event.resource),
        },
        ensure_ascii=False,
    )


# -- reading ------------------------------------------------------------------------------------


async def _redis_sources(options: TailOptions) -> tuple[str, ...]:
    """The sources whose streams exist now (``koprs:external:<name>`` keys of type stream)."""
    names = []
    doing = "list the streams of"
    async with redis_session(options.url, options.tls, options.auth, doing=doing) as client:
        async for key in client.scan_iter(match=f"{REDIS_STREAM_PREFIX}*", _type="stream"):
            name = (key.decode() if isinstance(key, bytes) else str(key))[
                len(REDIS_STREAM_PREFIX) :
            ]
            with contextlib.suppress(ValueError):
                names.append(validate_source_name(name))
    return tuple(sorted(names))


Closer = Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


async def _open_redis(options: TailOptions) -> tuple[Watch, Closer]:
    from bridge.consumer.redis import watch_redis

    sources = options.sources or await _redis_sources(options)
    if not sources:
        raise BridgeError(
            f"no koprs:external:* stream on {redact_url(options.url)} yet: name the sources "
            "with --source (their streams may be created later)"
        )
    if not options.sources:  # Redis has no subject wildcard: the streams are named up front
        print(
            f"koprs-bridge tail: the streams that exist now are {', '.join(sources)}; a source "
            "whose stream appears later is not followed: name it with --source, or start tail "
            "again",
            file=sys.stderr,
        )
    watch = watch_redis(
        options.url,
        sources,
        list_first=options.from_start,
        block_s=1.0,
        tls=options.tls,
        auth=options.auth,
    )
    return watch, _nothing


async def _open_nats(options: TailOptions) -> tuple[Watch, Closer]:
    import nats.js.errors

    from bridge.connections import connect_nats
    from bridge.consumer.nats import watch_nats

    prefix = options.subject_prefix

    said: list[str] = []

    async def on_error(exc: Exception) -> None:
        text = describe_error(exc)
        if text not in said[-1:]:  # a reconnection failing every 0.5 s is said once
            said.append(text)
            print(f"koprs-bridge tail: NATS {redact_url(options.url)}: {text}", file=sys.stderr)

    nc = await connect_nats(
        options.url,
        options.tls,
        options.auth,
        name="koprs-bridge-tail",
        connect_timeout_s=10,
        reconnect_wait_s=0.5,
        error_cb=on_error,
    )
    try:
        js = nc.jetstream()
        if options.stream is None:
            stream = await js.find_stream_name_by_subject(f"{prefix}.>")
        else:
            stream = (await js.stream_info(options.stream)).config.name or options.stream
    except nats.js.errors.NotFoundError:
        await nc.close()
        which = f"stream {options.stream}" if options.stream else f"stream captures {prefix}.>"
        raise BridgeError(
            f"no JetStream {which} on {redact_url(options.url)} (has the bridge published yet?)"
        ) from None
    except BaseException:
        await nc.close()
        raise
    watch = watch_nats(
        nc,
        options.sources,
        list_first=options.from_start,
        stream=stream,
        subject_prefix=prefix,
        confirm_acks=False,
    )
    return watch, nc.close


# -- running ------------------------------------------------------------------------------------


async def _follow(watch: Watch, options: TailOptions, out: TextIO) -> None:
    where = redact_url(options.url)
    what = ", ".join(options.sources) if options.sources else "every source"
    said = False
    async for item in watch:
        if isinstance(item, Synced):
            if not said:  # once: a watch that lists again after an outage syncs again
                said = True
                print(
                    f"koprs-bridge tail: following {where} ({what}); Ctrl-C stops", file=sys.stderr
                )
                sys.stderr.flush()
            if options.from_start:
                sources = list(item.sources) or list(options.sources)
                line = (
                    json.dumps({"synced": sources})
                    if options.as_json
                    else "--- synced: the current state is above; live changes follow ---"
                )
                out.write(line + "\n")
                out.flush()
            continue
        fmt = format_json if options.as_json else format_line
        out.write(fmt(item.envelope, initial=item.initial) + "\n")
        out.flush()
        await item.ack()


async def _inspect(options: TailOptions, stop: asyncio.Event) -> int:
    """``--stats`` (once) or ``--dead-letters`` (until stopped)."""
    from bridge.consumer import inspection

    if options.kind == "redis":
        sources = options.sources or await _redis_sources(options)
        client = redis_client(
            options.url, options.tls, options.auth, socket_timeout=10, socket_connect_timeout=10
        )
        try:
            if options.stats:
                stats = await inspection.redis_stats(client, sources)
                print(inspection.format_stats(stats, as_json=options.as_json))
                return 0
            follow: Awaitable[None] = inspection.follow_redis_dead_letters(
                client, sources, sys.stdout, as_json=options.as_json
            )
            _following(options, "the dead letters of " + ", ".join(sources))
            await _until_stopped(follow, stop)
            return 0
        finally:
            await client.aclose()
    from bridge.connections import connect_nats

    nc = await connect_nats(
        options.url, options.tls, options.auth, name="koprs-bridge-tail", connect_timeout_s=10
    )
    try:
        js = nc.jetstream()
        stream = options.stream or await js.find_stream_name_by_subject(
            f"{options.subject_prefix}.>"
        )
        if options.stats:
            stats = await inspection.nats_stats(js, stream)
            print(inspection.format_stats(stats, as_json=options.as_json))
            return 0
        follow = inspection.follow_nats_dead_letters(
            js, stream, options.subject_prefix, sys.stdout, as_json=options.as_json
        )
        _following(options, f"the dead letters of stream {stream}")
        await _until_stopped(follow, stop)
        return 0
    finally:
        await nc.close()


def _following(options: TailOptions, what: str) -> None:
    where = redact_url(options.url)
    print(f"koprs-bridge tail: following {where} ({what}); Ctrl-C stops", file=sys.stderr)
    sys.stderr.flush()


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopping):
            pending.cancel()
        await asyncio.gather(task, stopping, return_exceptions=True)
    error = task.exception() if task.done() and not task.cancelled() else None
    if error is not None:
        raise error


async def _main(options: TailOptions) -> int:
    with stop_on_signals(asyncio.Event()) as stop:
        if options.stats or options.dead_letters:
            return await _inspect(options, stop)
        watch, close = await (_open_nats if options.kind == "nats" else _open_redis)(options)
        follow = asyncio.create_task(_follow(watch, options, sys.stdout))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({follow, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            # Closing the watch ends an iteration waiting in the other task: a cancellation
            # alone can be lost in a client library that swallows CancelledError.
            await watch.aclose()
            await stop_with_grace([follow], grace_s=10.0)
            await close()
    if not follow.cancelled() and (error := follow.exception()) is not None:
        if isinstance(error, BrokenPipeError):  # e.g. `koprs-bridge tail ... | head`
            return 0
        raise error
    return 0


def run_tail(options: TailOptions) -> int:
    """Follow until Ctrl-C / SIGTERM (exit 0) or a fatal error (BridgeError)."""
    code = asyncio.run(_main(options))
    if sys.stdout.closed or _broken(sys.stdout):
        # stdout is a closed pipe: keep the interpreter from failing to flush it at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _broken(out: TextIO) -> bool:
    try:
        out.flush()
    except BrokenPipeError:
        return True
    return False
