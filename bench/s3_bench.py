"""Object store: listing and diffing a large bucket against listing it alone, same client.

``python -m bench.s3_bench`` (``--help``). moto's S3 server (``tests/support/servers.py``'s
``S3Server``, started through ``bench/s3_server.py``, which fills the bucket in-process before
it listens) holds N objects under one prefix. Each round times, alternately:

* **listing alone**: the ``list_objects_v2`` paginator (pages of 1,000) of the very client
  ``S3Store`` uses, every page's ``Contents`` walked and counted;
* **listing + diff**: ``ObjectStorePoller.changes()`` (``S3Store.list`` -> ``StoredObject`` per
  object -> ``ListingDiff`` against the committed state), on an unchanged bucket: the usual
  poll. The first poll (everything ``Added``) and its commit run before the rounds (reported).

The ratio is the throughput of listing + diff over that of listing alone (best round of each),
target >= 0.9. For scale, also timed: the server alone (plain unsigned GETs of the same pages,
the XML not parsed) and the process CPU time of each kind of run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO, Row, format_table, write_rows
from tests.support.servers import S3Server

TARGET = 0.9
BUCKET = "bench"
PREFIX = "objects/"


class PopulatedS3Server(S3Server):
    """moto's server with ``objects`` objects in bucket ``bench`` (see bench/s3_server.py)."""

    def __init__(self, objects: int, *, stock_listing: bool = False) -> None:
        super().__init__()
        self.objects = objects
        self.stock_listing = stock_listing

    def _command(self) -> list[str]:
        command = [sys.executable, str(REPO / "bench" / "s3_server.py"), "--port", str(self.port)]
        command += ["--bucket", BUCKET, "--objects", str(self.objects), "--prefix", PREFIX]
        command += ["--region", self.region]
        return command + (["--stock-listing"] if self.stock_listing else [])


_TOKEN = re.compile(rb"<NextContinuationToken>([^<]+)</NextContinuationToken>")


async def server_only(endpoint: str, page_size: int) -> tuple[float, int]:
    """Seconds to GET every page of the listing without parsing it (moto checks no signature)."""
    async with httpx.AsyncClient(base_url=endpoint, timeout=60) as client:
        token: bytes | None = None
        pages = 0
        start = time.perf_counter()
        while True:
            params = {"list-type": "2", "prefix": PREFIX, "max-keys": str(page_size)}
            if token is not None:
                params["continuation-token"] = token.decode()
            response = await client.get(f"/{BUCKET}", params=params)
            response.raise_for_status()
            pages += 1
            found = _TOKEN.search(response.content)
            if found is None:
                return time.perf_counter() - start, pages
            token = found[1]


async def measure(server: S3Server, n: int, rounds: int) -> dict[str, float]:
    from bridge.sources.objects import ObjectStorePoller
    from bridge.sources.stores.s3 import S3Store

    store = S3Store(
        BUCKET,
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )
    poller = ObjectStorePoller(store).with_prefix(PREFIX).with_name("bench")
    result: dict[str, float] = {"objects": n}
    try:
        start = time.perf_counter()
        changeset = await poller.changes()
        if len(changeset.events) != n:
            raise RuntimeError(f"first poll: {len(changeset.events)} events, expected {n}")
        changeset.commit()
        result["first_poll_s"] = time.perf_counter() - start
        del changeset
        client: Any = await store._s3()  # the very client S3Store lists with

        async def listing_only() -> None:
            paginator = client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=BUCKET, Prefix=PREFIX, PaginationConfig={"PageSize": store.page_size}
            )
            count = 0
            async for page in pages:
                count += len(page.get("Contents", ()))
            if count != n:
                raise RuntimeError(f"listing: {count} objects, expected {n}")

        async def listing_and_diff() -> None:
            changeset = await poller.changes()
            if changeset.events or changeset.delta:
                raise RuntimeError("the no-change poll found changes")

        best = {"list": float("inf"), "diff": float("inf"), "server": float("inf")}
        cpu = {"list": float("inf"), "diff": float("inf")}
        for r in range(rounds):
            for kind, run in (("list", listing_only), ("diff", listing_and_diff)):
                gc.collect()
                cpu0, start = time.process_time(), time.perf_counter()
                await run()
                elapsed = time.perf_counter() - start
                best[kind] = min(best[kind], elapsed)
                cpu[kind] = min(cpu[kind], time.process_time() - cpu0)
                print(f"s3: round {r + 1}/{rounds}: {kind} {elapsed:.2f} s", flush=True)
            server_s, pages = await server_only(server.endpoint_url, store.page_size)
            best["server"] = min(best["server"], server_s)
        result.update(
            list_s=best["list"],
            diff_s=best["diff"],
            server_s=best["server"],
            list_cpu_s=cpu["list"],
            diff_cpu_s=cpu["diff"],
            pages=pages,
        )
    finally:
        await poller.aclose()
    return result


def rows_of(m: dict[str, float]) -> list[Row]:
    n = int(m["objects"])
    ratio = m["list_s"] / m["diff_s"]
    return [
        Row(
            "s3",
            f"list+diff {n:,} objects (moto)",
            f"{n / m['diff_s']:,.0f} obj/s ({m['diff_s']:.2f} s)",
            f"listing alone {n / m['list_s']:,.0f} obj/s ({m['list_s']:.2f} s)",
            ratio,
            f"ratio >= {TARGET}",
            ratio >= TARGET,
            f"client CPU {m['diff_cpu_s']:.2f} s vs {m['list_cpu_s']:.2f} s; the server alone "
            f"(unparsed GETs of the {int(m['pages'])} pages) {m['server_s']:.2f} s; "
            f"first poll (all Added) {m['first_poll_s']:.2f} s",
            m,
        )
    ]


def run_rows(*, objects: int = 100_000, rounds: int = 3, stock_listing: bool = False) -> list[Row]:
    with PopulatedS3Server(objects, stock_listing=stock_listing) as server:
        print(f"s3: moto up with {objects:,} objects in {server.startup_s:.1f} s", flush=True)
        return rows_of(asyncio.run(measure(server, objects, rounds)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="best of N (default 3)")
    parser.add_argument(
        "--stock-listing", action="store_true", help="moto's own (slow) ListObjectsV2"
    )
    parser.add_argument("--rows-json", type=Path, help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = run_rows(objects=args.objects, rounds=args.rounds, stock_listing=args.stock_listing)
    print(format_table(rows))
    for row in rows:
        print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
