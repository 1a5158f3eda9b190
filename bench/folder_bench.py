"""A large ``local:`` folder: the CPU of a no-change poll and the memory of the tracked state.

``python -m bench.folder_bench --files 1000000`` (``--help``). Creates the files (empty, in
folders of 1,000) in a temporary directory, polls once (every file ``Added``, committed), then
measures, best of ``--repeat``:

* **bridge**: process CPU of ``ObjectStorePoller.changes()`` on the unchanged folder (the
  ``LocalStore`` listing and the diff against the packed state);
* **reference**: a bare ``os.scandir`` walk calling ``stat()`` on every file (the system calls
  any listing needs), same tree;
* **state**: bytes per tracked object of the poller's packed state (path strings, their
  pointers, the 16-byte ETag slots, plus the ETags that did not pack).

Targets, for 1,000,000 files (scaled to the count): no-change poll <= 3 s of CPU, state
<= 200 B per object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import Row, write_rows

TARGET_S_PER_MILLION = 3.0
TARGET_B = 200


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_tree(root: Path, files: int) -> None:
    for start in range(0, files, 1000):
        folder = root / f"d{start // 1000:04}"
        folder.mkdir()
        for i in range(start, min(files, start + 1000)):
            (folder / f"object-{i:07}.json").touch()


def walk(root: str) -> int:
    count, pending = 0, [root]
    while pending:
        with os.scandir(pending.pop()) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    entry.stat()
                    count += 1
    return count


async def measure(files: int, repeat: int) -> dict[str, float]:
    from bridge.sources.objects import ObjectStorePoller
    from bridge.sources.stores import LocalStore

    root = Path(tempfile.mkdtemp(prefix="koprs-bench-folder-"))
    try:
        make_tree(root, files)
        poller = ObjectStorePoller(LocalStore(root)).with_name("folder")
        poller.restore({})
        first = await poller.changes()
        assert len(first.events) == files
        first.commit()
        del first
        poll_s, walk_s = [], []
        for _ in range(repeat):
            started = _cpu_s()
            assert walk(str(root)) == files
            walk_s.append(_cpu_s() - started)
            started = _cpu_s()
            assert (await poller.changes()).events == []
            poll_s.append(_cpu_s() - started)
        state = poller._tracked
        state_b = (
            sum(sys.getsizeof(k) for k in state.key_list)
            + 8 * len(state.key_list)
            + len(state.digests)
            + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in state.unpacked.items())
        ) / files
        return {"files": files, "poll_s": min(poll_s), "walk_s": min(walk_s), "state_b": state_b,
                "unpacked": len(state.unpacked)}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_rows(*, files: int = 200_000, repeat: int = 2) -> list[Row]:
    m = asyncio.run(measure(files, repeat))
    target_s = TARGET_S_PER_MILLION * files / 1_000_000
    return [
        Row(
            "folder",
            f"local: {files:,} files, no-change poll CPU",
            f"{m['poll_s']:.2f} s",
            f"scandir+stat walk {m['walk_s']:.2f} s",
            m["poll_s"] / max(m["walk_s"], 1e-6),
            f"<= {target_s:.2f} s (3 s per 1,000,000)",
            m["poll_s"] <= target_s,
            f"{m['poll_s'] / files * 1e6:.2f} us per file, of which the bare walk "
            f"{m['walk_s'] / files * 1e6:.2f} us",
            m,
        ),
        Row(
            "folder",
            f"local: {files:,} files, tracked state",
            f"{m['state_b']:.0f} B/object",
            f"target {TARGET_B} B/object",
            m["state_b"] / TARGET_B,
            f"<= {TARGET_B} B/object",
            m["state_b"] <= TARGET_B,
            f"{int(m['unpacked'])} ETag(s) outside the packed slots",
            m,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rows-json", type=Path)
    args = parser.parse_args(argv)
    from bench.common import format_table

    rows = run_rows(files=args.files, repeat=args.repeat)
    print(format_table(rows))
    for row in rows:
        print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
