"""An example operator: mirror the items of one bridge source into a local folder.

::

    python examples/config_operator.py --broker nats://127.0.0.1:4222 --source inbox \\
        --target ./mirror
    python examples/config_operator.py --broker redis://127.0.0.1:6379/0 --source app-config \\
        --target /etc/app

It is written like a Kubernetes operator, with the consumer API of ``bridge.consumer``:

* a **watch** with list-then-watch (``watch_nats`` / ``watch_redis``): first the current state
  of every item, then a ``Synced`` marker, then live changes; it recovers from broker outages
  by itself;
* a **reflector** (``Reflector``), the cache of the current items, fed by the watch;
* a **reconcile** step that makes the target folder match the cache: one file per live item,
  named after the item's key as a subject token (flat and safe: ``dir/a.yaml`` becomes
  ``dir~2Fa~2Eyaml``), holding the body for an HTTP source, or the object's metadata as JSON
  for an object-store source. Items that are removed lose their file; when the initial list is
  in, files of items that no longer exist are pruned. Reconciling is idempotent (unchanged files
  are not rewritten), so a restart converges to the same folder.

Each action prints one line (``wrote KEY (FILE)``, ``deleted KEY (FILE)``, ``pruned FILE``,
``synced: N item(s) in FOLDER``). Ctrl-C or SIGTERM stops it (exit status 0). No durable
consumer is used: the cache lives in memory, so every start lists again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bridge.consumer.base import Delivery, Synced, Watch
from bridge.consumer.decoding import CustomResource
from bridge.consumer.reflector import Reflector
from bridge.sources.http import HttpResource
from bridge.subjects import encode_item_token

Say = Callable[[str], None]


def content(resource: Any) -> bytes:
    """What the file of an item holds."""
    if isinstance(resource, HttpResource):
        return resource.body
    if isinstance(resource, CustomResource):
        return json.dumps(resource.value, indent=2, sort_keys=True).encode() + b"\n"
    fields = dataclasses.asdict(resource)
    for name, value in fields.items():
        if isinstance(value, datetime):
            fields[name] = value.isoformat()
    return json.dumps(fields, indent=2, sort_keys=True).encode() + b"\n"


def write(path: Path, data: bytes) -> bool:
    """Write atomically unless the file already holds ``data``; whether it was written."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == data:
            return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def reconcile_one(target: Path, key: str, resource: Any, say: Say) -> None:
    """Make the file of one item match it (``resource`` None: the item is gone)."""
    path = target / encode_item_token(key)
    if resource is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            say(f"deleted {key} ({path.name})")
    elif write(path, content(resource)):
        say(f"wrote {key} ({path.name})")


def reconcile_all(target: Path, items: dict[str, Any], say: Say) -> None:
    """Make the whole folder match the items: write what is missing or stale, prune the rest."""
    wanted = {encode_item_token(key): key for key in items}
    for path in sorted(target.iterdir()):
        if path.is_file() and path.name not in wanted and not path.name.startswith("."):
            path.unlink()
            say(f"pruned {path.name}")
    for key, resource in sorted(items.items()):
        reconcile_one(target, key, resource, say)


async def operate(watch: Watch, source: str, target: Path, say: Say = print) -> None:
    """Run the operator on ``watch`` until it ends or the task is cancelled."""
    target.mkdir(parents=True, exist_ok=True)
    reflector = Reflector()
    try:
        async for item in reflector.reflect(watch):
            if isinstance(item, Synced):
                items = reflector.items(source)
                reconcile_all(target, items, say)
                say(f"synced: {len(items)} item(s) in {target}")
            elif isinstance(item, Delivery):
                if not item.initial and item.envelope.source_name == source:
                    key = item.envelope.key
                    reconcile_one(target, key, reflector.get(source, key), say)
                await item.ack()  # initial items are reconciled all together at Synced
    finally:
        await watch.aclose()


def open_watch(args: argparse.Namespace) -> Watch:
    """The list-then-watch of the source on the broker the URL names."""
    if args.broker.startswith(("nats://", "tls://")):
        from bridge.consumer.nats import watch_nats

        return watch_nats(
            args.broker, [args.source], stream=args.stream, subject_prefix=args.subject_prefix
        )
    from bridge.consumer.redis import watch_redis

    return watch_redis(args.broker, [args.source], block_s=1.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="nats://... or redis://...")
    parser.add_argument("--source", required=True, help="the bridge source to mirror")
    parser.add_argument("--target", required=True, type=Path, help="the folder to maintain")
    parser.add_argument("--stream", default="KOPRS_EXTERNAL", help="NATS: the stream")
    parser.add_argument("--subject-prefix", default="koprs.external", help="NATS: the prefix")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def say(line: str) -> None:
        print(line, flush=True)

    watch = open_watch(args)
    task = asyncio.create_task(operate(watch, args.source, args.target, say))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    # Closing the watch ends the iteration in the other task wherever it waits (a cancellation
    # can be lost inside a client library that swallows CancelledError); cancel as a last resort.
    await watch.aclose()
    done, _ = await asyncio.wait({task}, timeout=10)
    while not done:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
