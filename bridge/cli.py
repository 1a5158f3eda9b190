"""The ``koprs-bridge`` command.

``run [--config FILE]``   run the bridge (no config: the embedded default, see README);
                          the config file is re-read when it changes (``--reload-interval``)
``check --config FILE``   validate a config file and exit (2 when invalid)
``status --config FILE``  which replica leads which source (leader election in Redis)
``tail --config FILE | --broker URL [--source NAME ...] [--json] [--from-start]``
                          follow the broker: one line per event (JSON lines with --json);
                          ``--stats``: consumers and their lag; ``--dead-letters``: dead letters
``asyncapi --config FILE [--format json|yaml]``
                          print the AsyncAPI 3.0 document of what the bridge publishes
``init [--http URL] [--s3 s3://BUCKET/PREFIX] [--local PATH] [--broker URL] [--redis URL]``
                          write a commented starter bridge.yaml for those sources
``config-schema``         print the JSON Schema of the config file (for editors and CI)

``--log-level`` goes before or after the subcommand. Invalid configs exit with status 2 and
one line per problem naming the file (or the environment variable), the key and the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import BridgeError, ConfigError

if TYPE_CHECKING:
    from bridge.service.config import BridgeConfig

__all__ = ["main"]

log = logging.getLogger("bridge")
EXIT_INVALID = 2


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)``, on uvloop when it is installed (the ``fast`` extra: ~10 % less
    CPU per poll, see bench/README.md) unless ``$KOPRS_BRIDGE_EVENT_LOOP`` is ``asyncio``."""
    if os.environ.get("KOPRS_BRIDGE_EVENT_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from bridge.telemetry.logs import basic_logging

    basic_logging(args.log_level or "info")
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "run":
            return run_loop(_run(args))
        if args.command == "status":
            return asyncio.run(_status(args.config, as_json=args.json))
        if args.command == "tail":
            return _tail(args)
        if args.command == "asyncapi":
            return _asyncapi(args.config, args.format)
        if args.command == "init":
            return _init(args)
        if args.command == "config-schema":
            return _config_schema()
    except ConfigError as exc:
        problems = str(exc).splitlines()  # one per line, each naming its file or variable
        if len(problems) > 1:
            problems.insert(0, f"{len(problems)} problems:")
        print("koprs-bridge: invalid config: " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_INVALID
    except BridgeError as exc:
        print(f"koprs-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return EXIT_INVALID


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koprs-bridge",
        description="Poll external sources and publish their changes as CloudEvents.",
    )
    _shared_options(parser, default=os.environ.get("KOPRS_BRIDGE_LOG_LEVEL"))
    # The same options after the subcommand (`run --log-level debug`): defaults suppressed, so
    # that a subcommand without them keeps what was given before it (or the default above).
    shared = argparse.ArgumentParser(add_help=False)
    _shared_options(shared, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[shared], help=help, description=description)

    run = command("run", help="run the bridge")
    run.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("KOPRS_BRIDGE_CONFIG"),
        help="YAML config (default: $KOPRS_BRIDGE_CONFIG; none: embedded default)",
    )
    run.add_argument(
        "--inbox",
        type=Path,
        default=Path("koprs-bridge-inbox"),
        help="embedded default only: the folder to watch",
    )
    run.add_argument(
        "--home",
        type=Path,
        default=Path(".koprs-bridge"),
        help="embedded default only: where NATS data and state are kept",
    )
    run.add_argument(
        "--reload-interval",
        type=float,
        default=os.environ.get("KOPRS_BRIDGE_RELOAD_INTERVAL", "5"),
        metavar="SECONDS",
        help="how often the config file is checked for changes, which are applied without a "
        "restart (default: $KOPRS_BRIDGE_RELOAD_INTERVAL or 5; 0: never)",
    )
    check = command("check", help="validate a config file")
    check.add_argument("--config", type=Path, required=True)
    status = command("status", help="show which replica leads which source")
    status.add_argument("--config", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="print JSON")
    tail = command(
        "tail",
        help="follow a broker: one line per event",
        description="Print what the bridge publishes, one line per event, until Ctrl-C.",
    )
    target = tail.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", type=Path, help="the bridge's YAML config (broker, sources)")
    target.add_argument("--broker", metavar="URL", help="nats://... or redis://... directly")
    tail.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME",
        help="only this source (repeatable; default: every source)",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument(
        "--from-start",
        action="store_true",
        help="list then watch: first the current state of every item, then live changes",
    )
    tail.add_argument(
        "--subject-prefix", help="with --broker nats://: subject prefix (default koprs.external)"
    )
    shown = tail.add_mutually_exclusive_group()
    shown.add_argument(
        "--stats", action="store_true", help="print the consumers (groups) and their lag, exit"
    )
    shown.add_argument(
        "--dead-letters", action="store_true", help="follow the dead letters, not the events"
    )
    asyncapi = command(
        "asyncapi", help="print the AsyncAPI 3.0 document of what the bridge publishes"
    )
    asyncapi.add_argument("--config", type=Path, required=True)
    asyncapi.add_argument("--format", choices=["json", "yaml"], default="json")
    init = command(
        "init",
        help="write a commented starter bridge.yaml",
        description="Write a starter config for the sources named (at least one); "
        "`check` accepts it as written.",
    )
    init.add_argument("--http", action="append", default=[], metavar="URL", help="repeatable")
    init.add_argument(
        "--s3", action="append", default=[], metavar="s3://BUCKET/PREFIX", help="repeatable"
    )
    init.add_argument("--local", action="append", default=[], metavar="PATH", help="repeatable")
    init.add_argument("--broker", default="nats://127.0.0.1:4222", help="nats:// or redis:// URL")
    init.add_argument("--redis", metavar="URL", help="leader election's Redis (several replicas)")
    init.add_argument("--interval", default="30s", help="poll interval of each source (30s)")
    init.add_argument(
        "--output", type=Path, default=Path("bridge.yaml"), help="file to write; - for stdout"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    command("config-schema", help="print the JSON Schema of the config file")
    return parser


def _init(args: argparse.Namespace) -> int:
    import yaml

    from bridge.service.config import parse_config
    from bridge.service.starter import StarterOptions, starter_config

    text = starter_config(
        StarterOptions(
            broker=args.broker,
            redis=args.redis,
            http=args.http,
            s3=args.s3,
            local=args.local,
            interval=args.interval,
        )
    )
    parse_config(yaml.safe_load(text), origin="<koprs-bridge init>", env={})  # check accepts it
    if str(args.output) == "-":
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        raise BridgeError(f"{args.output} exists: choose another --output, or --force")
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}; next:")
    print(f"  koprs-bridge check --config {args.output}")
    print(f"  koprs-bridge run --config {args.output}")
    return 0


def _shared_options(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    """The options every subcommand takes, before or after its name."""
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="default: $KOPRS_BRIDGE_LOG_LEVEL, else the config's logging.level, else info",
    )


def _check(path: Path) -> int:
    from bridge.extras import check_config_extras
    from bridge.service.config import load_config

    config = load_config(path)
    check_config_extras(config)
    print(f"{path}: OK, broker {config.broker.description}, {len(config.sources)} source(s):")
    for source in config.sources:
        print(f"  {source.name}: {source.kind} every {source.interval_s:g}s")
    return 0


async def _status(path: Path, *, as_json: bool) -> int:
    import json

    from bridge.connections import redis_session
    from bridge.ha.sharing import election_status
    from bridge.service.config import load_config

    config = load_config(path)
    if config.leader_election is None:
        print(f"{path}: no leader_election configured: one replica leads every source")
        return 0
    election = config.leader_election
    url, doing = election.redis_url.reveal(), "read the election state from Redis"
    async with redis_session(url, election.tls, election.auth, doing=doing, timeout_s=5) as client:
        status = await election_status(client, [s.name for s in config.sources])
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"live replicas: {', '.join(status['replicas']) or 'none'}")
    for name, held in status["sources"].items():
        holder = held["holder"] or "(no leader)"
        print(f"  {name:<24} {holder:<32} fence={held['fence']} revision={held['revision']}")
    return 0


def _asyncapi(path: Path, fmt: str) -> int:
    from bridge.asyncapi import asyncapi_document, render
    from bridge.service.config import load_config

    document = asyncapi_document(load_config(path))
    sys.stdout.write(render(document, "yaml" if fmt == "yaml" else "json"))
    return 0


def _config_schema() -> int:
    import json

    from bridge.service.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def _tail(args: argparse.Namespace) -> int:
    from bridge.tail import TailOptions, run_tail

    options = TailOptions.from_args(
        config=args.config,
        broker=args.broker,
        sources=args.source,
        as_json=args.json,
        from_start=args.from_start,
        subject_prefix=args.subject_prefix,
        stats=args.stats,
        dead_letters=args.dead_letters,
    )
    return run_tail(options)


async def _run(args: argparse.Namespace) -> int:
    from bridge.aio import stop_on_signals
    from bridge.service.runner import Bridge

    with stop_on_signals(asyncio.Event()) as stop:
        if args.config is not None:
            if args.reload_interval <= 0:
                await Bridge(_logging_from(_load_for_run(args.config), args)).run(stop)
                return 0
            from bridge.service.reload import ConfigWatcher, run_with_reload

            watcher = ConfigWatcher(args.config, interval_s=args.reload_interval)  # before loading
            config = _logging_from(_load_for_run(args.config), args)
            await run_with_reload(Bridge(config), watcher, stop)
            return 0
        return await _run_embedded(args.inbox, args.home, stop)


def _load_for_run(path: Path) -> BridgeConfig:
    """The config, refused if a part of it needs an extra that is not installed."""
    from bridge.extras import check_config_extras
    from bridge.service.config import load_config

    config = load_config(path)
    check_config_extras(config)
    return config


def _logging_from(config: BridgeConfig, args: argparse.Namespace) -> BridgeConfig:
    """Apply the config's ``logging`` section (format; level unless ``--log-level``)."""
    from bridge.telemetry.logs import configure_logging

    configure_logging(config.logging, level=args.log_level)
    return config


async def _run_embedded(inbox: Path, home: Path, stop: asyncio.Event) -> int:
    from bridge.service.embedded import banner, embedded_config, nats_server, print_events
    from bridge.service.runner import Bridge

    inbox.mkdir(parents=True, exist_ok=True)
    async with nats_server(home / "nats") as url:
        config = embedded_config(url, inbox, home)
        print(banner(url, inbox, home), flush=True)
        await Bridge(config, on_published=print_events).run(stop)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
