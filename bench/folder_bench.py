"""A large ``local:`` folder: the CPU of its polls and the memory of its tracked state.

``python -m bench.folder_bench --files 1000000`` (``--help``). Creates the files (empty, in
folders of 1,000) under ``--dir`` (default: ``/dev/shm`` when there is one, a tmpfs, so 1,000,000
files take about 10 s; else the temporary directory), then measures, in one process:

* **first poll**: process CPU of the first ``ObjectStorePoller.changes()`` (every file
  ``Added``) and its commit;
* **no-change poll**: process CPU of ``changes()`` on the unchanged folder (the ``LocalStore``
  listing and the diff against the packed state), best of ``--repeat``, against the
  **reference**: a bare ``os.scandir`` walk calling ``stat()`` on every file (the system calls
  any listing needs), same tree, measured in the same rounds;
* **1 % changed**: a poll after 1 % of the files (spread over every folder) got a new mtime;
* **steady RSS**: the process's resident memory after the first poll was committed and a
  no-change poll ran, minus what it was before the first poll, per tracked object; and the
  packed state's own size (path strings, their pointers, the 16-byte ETag slots, plus the
  ETags that did not pack).

Targets, for 1,000,000 files (scaled to the count): no-change poll <= 3 s of CPU, steady RSS
<= 200 B per object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import Row, rss_bytes, write_rows

TARGET_S_PER_MILLION = 3.0
TARGET_B = 200
PER_FOLDER = 1000


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def default_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def make_tree(root: Path, files: int) -> None:
    """``files`` empty files, ``PER_FOLDER`` per folder (``d0000/object-0000000.json``...)."""
    flags = os.O_CREAT | os.O_WRONLY
    for start in range(0, files, PER_FOLDER):
        folder = root / f"d{start // PER_FOLDER:04}"
        folder.mkdir()
        for i in range(start, min(files, start + PER_FOLDER)):
            os.close(os.open(folder / f"object-{i:07}.json", flags, 0o644))


def change_some(root: Path, files: int, every: int) -> int:
    """Give every ``every``-th file a new mtime (1 s later); how many."""
    changed = 0
    for i in range(0, files, every):
        path = root / f"d{i // PER_FOLDER:04}" / f"object-{i:07}.json"
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        changed += 1
    return changed


def walk(root: str) -> int:
    """The reference: a bare ``os.scandir`` walk, ``stat()`` on every file."""
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


async def measure(files: int, repeat: int, where: Path) -> dict[str, float]:
    from bridge.sources.objects import ObjectStorePoller
    from bridge.sources.stores import LocalStore

    root = Path(tempfile.mkdtemp(prefix="koprs-bench-folder-", dir=where))
    try:
        make_tree(root, files)
        poller = ObjectStorePoller(LocalStore(root)).with_name("folder")
        poller.restore({})
        gc.collect()
        rss_before = rss_bytes()
        started = _cpu_s()
        first = await poller.changes()
        assert len(first.events) == files, len(first.events)
        first.commit()
        first_s = _cpu_s() - started
        del first
        gc.collect()
        poll_s, walk_s = [], []
        for _ in range(repeat):
            started = _cpu_s()
            assert walk(str(root)) == files
            walk_s.append(_cpu_s() - started)
            started = _cpu_s()
            assert (await poller.changes()).events == []
            poll_s.append(_cpu_s() - started)
        gc.collect()
        steady_b = (rss_bytes() - rss_before) / files
        changed = change_some(root, files, 100)
        started = _cpu_s()
        changes = await poller.changes()
        changed_s = _cpu_s() - started
        assert len(changes.events) == changed, (len(changes.events), changed)
        assert all(event.kind == "modified" for event in changes.events)
        state = poller._tracked
        state_b = (
            sum(sys.getsizeof(k) for k in state.key_list)
            + 8 * len(state.key_list)
            + len(state.digests)
            + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in state.unpacked.items())
        ) / files
        return {"files": files, "poll_s": min(poll_s), "walk_s": min(walk_s),
                "first_s": first_s, "changed_s": changed_s, "changed": changed,
                "steady_b": steady_b, "state_b": state_b,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "unpacked": len(state.unpacked)}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_rows(*, files: int = 200_000, repeat: int = 2, where: Path | None = None) -> list[Row]:
    m = asyncio.run(measure(files, repeat, where or default_dir()))
    target_s = TARGET_S_PER_MILLION * files / 1_000_000
    walk_s = max(m["walk_s"], 1e-6)
    return [
        Row(
            "folder",
            f"local: {files:,} files, no-change poll CPU",
            f"{m['poll_s']:.2f} s",
            f"scandir+stat walk {m['walk_s']:.2f} s",
            m["poll_s"] / walk_s,
            f"<= {target_s:.2f} s (3 s per 1,000,000)",
            m["poll_s"] <= target_s,
            f"ratio = poll / walk (CPU); {m['poll_s'] / files * 1e6:.2f} us per file, of which "
            f"the bare walk {m['walk_s'] / files * 1e6:.2f} us; best of {repeat}",
            m,
        ),
        Row(
            "folder",
            f"local: {files:,} files, poll with 1 % changed",
            f"{m['changed_s']:.2f} s",
            f"scandir+stat walk {m['walk_s']:.2f} s",
            m["changed_s"] / walk_s,
            "",
            None,
            f"{int(m['changed']):,} Modified; ratio = poll / walk (CPU)",
            m,
        ),
        Row(
            "folder",
            f"local: {files:,} files, first poll (all Added)",
            f"{m['first_s']:.2f} s",
            f"scandir+stat walk {m['walk_s']:.2f} s",
            m["first_s"] / walk_s,
            "",
            None,
            "CPU of the listing, the diff and the commit; ratio = poll / walk (CPU)",
            m,
        ),
        Row(
            "folder",
            f"local: {files:,} files, steady RSS",
            f"{m['steady_b']:.0f} B/object",
            f"packed state {m['state_b']:.0f} B/object",
            m["steady_b"] / TARGET_B,
            f"<= {TARGET_B} B/object",
            m["steady_b"] <= TARGET_B,
            f"RSS after the first poll (committed) and {repeat} no-change polls, minus before "
            f"it; ratio = RSS / target; peak RSS {m['peak_mb']:.0f} MB; "
            f"{int(m['unpacked'])} ETag(s) outside the packed slots",
            m,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=default_dir(), help="where the folder goes")
    parser.add_argument("--rows-json", type=Path)
    args = parser.parse_args(argv)
    from bench.common import format_table

    rows = run_rows(files=args.files, repeat=args.repeat, where=args.dir)
    print(format_table(rows))
    for row in rows:
        print(f"  {row.name}: {row.note}")
    if args.rows_json:
        write_rows(args.rows_json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
