"""moto's S3 server with a bucket already holding N objects: ``python bench/s3_server.py``.

Putting 100,000 objects through the S3 API takes minutes on moto; here they are put straight
into moto's in-memory backend (``S3Backend.put_object``, the function the PUT handler calls:
about 30 µs per object) before the server starts listening, in the same process the server then
runs in (moto's own ``moto.server`` entry point). Objects: ``<prefix><i:08d>.json``, each with
its own small body, so each has its own ETag.

moto's ``ListObjectsV2`` collects and sorts every key of the bucket for every page (0.17 s per
page of 1,000 at 100,000 objects: 17 s per listing, all of it server time, which would hide the
client side the benchmark compares). Unless ``--stock-listing`` is given, it is replaced by one
that keeps the bucket's keys sorted once and bisects to each page (the same answer for a bucket
nobody writes to, which is how the benchmark uses it; a changed number of keys rebuilds the
index).
"""

from __future__ import annotations

import argparse
import bisect
import sys
import time
from collections.abc import Sequence
from typing import Any


def populate(bucket: str, count: int, prefix: str, region: str) -> Any:
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(bucket, region)
    for i in range(count):
        backend.put_object(bucket, f"{prefix}{i:08d}.json", b'{"object": %d}' % i)
    return backend


def install_fast_listing(backend_type: type[Any]) -> None:
    from moto.s3.models import FakeDeleteMarker, FakeKey

    original = backend_type.list_objects_v2
    index: dict[str, tuple[int, list[str]]] = {}

    def list_objects_v2(  # noqa: PLR0917 (moto's signature)
        self: Any,
        bucket: Any,
        prefix: str | None,
        delimiter: str | None,
        continuation_token: str | None,
        start_after: str | None,
        max_keys: int,
    ) -> Any:
        if delimiter or not isinstance(getattr(bucket, "keys", None), dict):
            return original(
                self, bucket, prefix, delimiter, continuation_token, start_after, max_keys
            )
        keys = bucket.keys
        cached = index.get(bucket.name)
        if cached is None or cached[0] != len(keys):
            names = sorted(
                name for name, key in keys.items() if not isinstance(key, FakeDeleteMarker)
            )
            cached = index[bucket.name] = (len(keys), names)
        names = cached[1]
        low = bisect.bisect_left(names, prefix) if prefix else 0
        after = self._pagination_tokens.get(continuation_token) if continuation_token else None
        after = after or start_after
        if after:
            low = max(low, bisect.bisect_right(names, after))
        high = low
        page: list[FakeKey] = []
        while high < len(names) and len(page) < max_keys:
            name = names[high]
            if prefix and not name.startswith(prefix):
                break
            page.append(keys[name])
            high += 1
        more = high < len(names) and (not prefix or names[high].startswith(prefix))
        if max_keys == 0:
            return [], False, None
        token = None
        if more:
            from moto.utilities.utils import md5_hash

            token = md5_hash(page[-1].name.encode("utf-8")).hexdigest()
            self._pagination_tokens[token] = page[-1].name
        return page, more, token

    backend_type.list_objects_v2 = list_objects_v2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bucket", default="bench")
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--prefix", default="objects/")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--stock-listing", action="store_true", help="moto's own ListObjectsV2")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    backend = populate(args.bucket, args.objects, args.prefix, args.region)
    print(f"put {args.objects} objects in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if not args.stock_listing:
        install_fast_listing(type(backend))
    from moto.server import main as moto_main

    moto_main(["-H", args.host, "-p", str(args.port)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
