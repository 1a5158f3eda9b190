"""Benchmark the object-store listing diff (``diff_listing`` / ``ListingDiff``) on a large bucket.

Run it from the repository root::

    .venv/bin/python bench/diff_bench.py [--objects N] [--repeat R]

The issue's targets, for 1,000,000 tracked objects with 36-character keys: a no-change diff
in under 0.5 s of CPU, and under 150 bytes of memory per tracked object beyond the listing
itself. Listings are built as ``S3Store.list`` yields them: pages of 1000 ``StoredObject``
(uuid4 keys in lexicographic order, 32-hex ETags stripped of their quotes, a size and a
``last_modified`` datetime), and every listing is made of *new* string objects with equal
content, as a new S3 response would be, so the diff pays for hashing the keys and for comparing
distinct strings, and the state's strings are never shared with a later listing.

The tracked state is what ``ObjectStorePoller`` keeps: a ``PackedState`` (the keys in a sorted
list, the ETags as 16-byte digests in one ``bytearray``), committed from the first poll's
changeset; the diff merges each listing with it.

Each measurement runs in its own child process (started by this script) so that RSS figures
start from a clean heap and tracemalloc does not slow the CPU timings.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import heapq
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # the package is used from the checkout, not installed
    sys.path.insert(0, str(_ROOT))

from bridge.events import Added, Modified, Removed  # noqa: E402
from bridge.sources.objects import diff_listing  # noqa: E402
from bridge.sources.packed import PackedState  # noqa: E402
from bridge.sources.stores import StoredObject  # noqa: E402

PAGE_SIZE = 1000
CHANGE_PERIOD = 300  # 1% changes: per 300 objects, one modified, one removed, one added
CPU_TARGET_S_PER_MILLION = 0.5
MEMORY_TARGET_B = 150.0
PYMALLOC_ALIGN = 16  # small objects (<= 512 B) are rounded up to 16 bytes on 64-bit CPython
T0 = 1_700_000_000

Listing = list[list[StoredObject]]
Record = tuple[str, str, int]  # key, quoted ETag as in the S3 XML, size
Result = dict[str, Any]


class Corpus:
    """The bucket's content, generated once (deterministic); listings are built from it."""

    def __init__(self, n: int, seed: int = 20240501) -> None:
        rng = random.Random(seed)

        def key() -> str:
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))

        def etag() -> str:
            return f'"{rng.getrandbits(128):032x}"'

        self.n = n
        self.keys = sorted(key() for _ in range(n))
        self.etags = [etag() for _ in range(n)]
        self.sizes = [rng.randrange(1 << 10, 1 << 24) for _ in range(n)]
        self.extra_keys = sorted(key() for _ in range(n // CHANGE_PERIOD))
        self.extra_etags = [etag() for _ in self.extra_keys]

    def records(self) -> Iterator[Record]:
        return zip(self.keys, self.etags, self.sizes, strict=True)

    def changed_records(self) -> Iterator[Record]:
        """The listing after ~1% changes, still in key order: every CHANGE_PERIOD objects one
        ETag changes (offset 0), one object is gone (offset CHANGE_PERIOD // 2), and the extra
        keys (one per period) appear wherever they sort."""

        def base() -> Iterator[Record]:
            for i, (key, etag, size) in enumerate(self.records()):
                phase = i % CHANGE_PERIOD
                if phase == 0:
                    yield key, f'"{int(etag[1:-1], 16) ^ 1:032x}"', size
                elif phase != CHANGE_PERIOD // 2:
                    yield key, etag, size

        extra = ((k, e, 4096) for k, e in zip(self.extra_keys, self.extra_etags, strict=True))
        return heapq.merge(base(), extra)

    def expected_changes(self) -> dict[str, int]:
        return {
            "added": len(self.extra_keys),
            "modified": len(range(0, self.n, CHANGE_PERIOD)),
            "removed": len(range(CHANGE_PERIOD // 2, self.n, CHANGE_PERIOD)),
        }


def build_listing(records: Iterable[Record]) -> Listing:
    """Pages of fresh ``StoredObject``, made the way ``S3Store.list`` makes them."""
    pages: Listing = []
    page: list[StoredObject] = []
    for key, etag, size in records:
        page.append(
            StoredObject(
                key.encode().decode(),  # a new str, equal content (as parsed from a response)
                etag.strip('"'),  # a new str, as S3Store strips the quotes
                size,
                datetime.fromtimestamp(T0 + size % 31_536_000, UTC),
            )
        )
        if len(page) == PAGE_SIZE:
            pages.append(page)
            page = []
    if page:
        pages.append(page)
    return pages


def reference(state: dict[str, str], pages: Sequence[Sequence[StoredObject]]) -> int:
    """The least a diff against a dict must do: walk the listing, one ``dict.get`` and compare
    per object (the state before ``PackedState``: a ``dict`` path -> ETag)."""
    get = state.get
    changed = 0
    for page in pages:
        for obj in page:
            if get(obj.path) != obj.etag:
                changed += 1
    return changed


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc), so RSS deltas start clean."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_hwm() -> bool:
    """Reset the peak RSS (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rounded(size: int) -> int:
    return size if size > 512 else -(-size // PYMALLOC_ALIGN) * PYMALLOC_ALIGN


def check_changes(corpus: Corpus, events: Sequence[Any], delta: dict[str, str | None]) -> None:
    counts = {
        "added": sum(isinstance(e, Added) for e in events),
        "modified": sum(isinstance(e, Modified) for e in events),
        "removed": sum(isinstance(e, Removed) for e in events),
    }
    if counts != corpus.expected_changes() or len(delta) != len(events):
        raise AssertionError(f"1% diff: got {counts}, expected {corpus.expected_changes()}")
    removed = [e.resource.path for e in events if isinstance(e, Removed)]
    n_removed = len(removed)
    if removed != sorted(removed) or any(isinstance(e, Removed) for e in events[:-n_removed]):
        raise AssertionError("removals must come last, sorted by path")


# -- phases (each runs in a child process and prints one JSON object) ----------------------


def phase_cpu(n: int, repeat: int) -> Result:
    corpus = Corpus(n)
    pages = build_listing(corpus.records())
    gc.collect()
    start = time.process_time()
    state = PackedState()
    changeset = diff_listing(state, pages)  # the first poll: everything is Added
    changeset.commit()
    initial = time.process_time() - start
    del pages, changeset
    plain = dict(state.items())  # for the reference loop
    runs: dict[str, list[float]] = {"reference": [], "nochange": [], "changed": []}
    for _ in range(repeat):
        pages = build_listing(corpus.records())
        gc.collect()
        start = time.process_time()
        changed = reference(plain, pages)
        runs["reference"].append(time.process_time() - start)
        if changed:
            raise AssertionError("reference: the fresh listing should match the state")
        del pages

        pages = build_listing(corpus.records())
        gc.collect()
        start = time.process_time()
        changeset = diff_listing(state, pages)
        runs["nochange"].append(time.process_time() - start)
        if changeset.events or changeset.delta:
            raise AssertionError("no-change diff produced events")
        del pages, changeset

        pages = build_listing(corpus.changed_records())
        gc.collect()
        start = time.process_time()
        changeset = diff_listing(state, pages)
        runs["changed"].append(time.process_time() - start)
        check_changes(corpus, changeset.events, changeset.delta)
        del pages, changeset  # not committed: every run diffs against the same state

    # Committing the 1% changeset (a merge of ~1% inserts, deletes and updates), into a copy.
    copy = PackedState(state)
    changeset = diff_listing(copy, build_listing(corpus.changed_records()))
    gc.collect()
    start = time.process_time()
    changeset.commit()
    commit_changed = time.process_time() - start
    if (
        len(copy)
        != len(state) + corpus.expected_changes()["added"] - corpus.expected_changes()["removed"]
    ):
        raise AssertionError("the 1% commit left the wrong number of entries")
    del copy, changeset
    # Restoring from a checkpoint (a dict path -> ETag, as the state stores load it).
    gc.collect()
    start = time.process_time()
    restored = PackedState(plain)
    restore = time.process_time() - start
    if restored != state:
        raise AssertionError("restore changed the state")
    return {"initial": initial, "commit_changed": commit_changed, "restore": restore, **runs}


def phase_tracemalloc(n: int) -> Result:
    corpus = Corpus(n)
    gc.collect()
    tracemalloc.start()  # only what is allocated from here on is counted
    pages = build_listing(corpus.records())
    listing_bytes = tracemalloc.get_traced_memory()[0]
    etag_strs = sum(sys.getsizeof(obj.etag) for page in pages for obj in page)
    state = PackedState()
    changeset = diff_listing(state, pages)
    changeset.commit()
    del pages, changeset
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0]
    key_list = sys.getsizeof(state.key_list)
    digests = sys.getsizeof(state.digests)
    unpacked = sys.getsizeof(state.unpacked)
    keys = [sys.getsizeof(k) for k in state.key_list]
    shared = sum(sys.getrefcount(k) > 3 for k in state.key_list)  # list + loop var + argument

    def diff_peak(records: Iterator[Record]) -> tuple[int, int]:
        pages = build_listing(records)
        gc.collect()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        changeset = diff_listing(state, pages)
        current, peak = tracemalloc.get_traced_memory()
        del changeset
        return peak - base, current - base

    nochange_peak, nochange_kept = diff_peak(corpus.records())
    changed_peak, changed_kept = diff_peak(corpus.changed_records())
    tracemalloc.stop()
    return {
        "listing": listing_bytes,
        "retained": retained,
        "structure": key_list + digests + unpacked,
        "key_list": key_list,
        "digests": digests,
        "unpacked": unpacked,
        "unpacked_entries": len(state.unpacked),
        "key_bytes": sum(keys),
        "key_alloc": sum(map(rounded, keys)),
        "key_len": len(state.key_list[0]),
        "etag_str_bytes": etag_strs,
        "etag_len": len(state.etag_at(0)),
        "shared_keys": shared,
        "nochange_peak": nochange_peak,
        "nochange_kept": nochange_kept,
        "changed_peak": changed_peak,
        "changed_kept": changed_kept,
    }


def phase_rss(n: int) -> Result:
    corpus = Corpus(n)
    gc.collect()
    trim_heap()  # else the listing reuses memory freed while building the corpus
    rss0 = rss_bytes()
    pages = build_listing(corpus.records())
    gc.collect()
    rss1 = rss_bytes()
    state = PackedState()
    changeset = diff_listing(state, pages)
    changeset.commit()
    del pages, changeset
    gc.collect()
    rss2 = rss_bytes()
    pages = build_listing(corpus.records())
    gc.collect()
    rss3 = rss_bytes()
    trim_heap()
    rss3_trimmed = rss_bytes()
    hwm = reset_hwm()
    changeset = diff_listing(state, pages)
    peak = hwm_bytes() if hwm else rss_bytes()
    del changeset, pages
    return {
        "listing": rss1 - rss0,
        "retained": rss2 - rss0,
        "beyond_listing": rss3 - rss1,
        "beyond_listing_trimmed": rss3_trimmed - rss1,
        "diff_peak": peak - rss3_trimmed,
        "hwm": hwm,
    }


# -- report ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_phase(name: str, n: int, repeat: int) -> Result:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name]
    cmd += ["--objects", str(n), "--repeat", str(repeat)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"phase {name} failed (exit {done.returncode})")
    result: Result = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def report(n: int, repeat: int) -> int:
    system = f"{platform.system()} {platform.machine()}"
    print(f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, {system}")
    print(f"Python:  {platform.python_implementation()} {platform.python_version()}")
    print(
        f"Listing: {n:,} objects in pages of {PAGE_SIZE} StoredObject; 36-char uuid4 keys, "
        "32-hex ETags; fresh strings for every listing"
    )
    print("\nrunning cpu phase ...", file=sys.stderr, flush=True)
    cpu = run_phase("cpu", n, repeat)
    print("running tracemalloc phase ...", file=sys.stderr, flush=True)
    mem = run_phase("tracemalloc", n, repeat)
    print("running rss phase ...", file=sys.stderr, flush=True)
    rss = run_phase("rss", n, repeat)

    ref_best, ref_med = min(cpu["reference"]), statistics.median(cpu["reference"])
    print(f"\nCPU time (time.process_time), {repeat} runs, a fresh listing per run, gc enabled")
    print(f"  {'':44} {'best':>9} {'median':>9} {'ns/object':>10} {'/ reference':>12}")
    rows = [
        ("reference: plain dict.get loop (a dict state)", "reference"),
        ("no-change diff, diff_listing(state, pages)", "nochange"),
        ("1% changes diff (info)", "changed"),
    ]
    for label, key in rows:
        best, med = min(cpu[key]), statistics.median(cpu[key])
        ratio = f"{best / ref_best:.2f}x/{med / ref_med:.2f}x"
        print(f"  {label:44} {best:8.3f}s {med:8.3f}s {best / n * 1e9:10.0f} {ratio:>12}")
    print(f"  {'first poll: diff (all Added) + commit, 1 run':44} {cpu['initial']:8.3f}s")
    print(f"  {'commit of the 1% changeset (a merge), 1 run':44} {cpu['commit_changed']:8.3f}s")
    print(f"  {'restore from a dict checkpoint, 1 run':44} {cpu['restore']:8.3f}s")
    print("  (ratio: best/best and median/median against the reference loop)")
    print("  (each run diffs a listing built just before, untimed, of new strings, whose")
    print("  hashes are not cached yet; the state is never changed by the timed diffs)")

    per = float(n)
    structure, retained = mem["structure"] / per, mem["retained"] / per
    keys, etag_strs = mem["key_bytes"] / per, mem["etag_str_bytes"] / per
    alloc = (mem["structure"] + mem["key_alloc"]) / per
    other = retained - structure - keys

    def row(label: str, value: float, *notes: str) -> None:
        print(f"  {label:60} {value:8.1f}")
        for note in notes:
            print(f"      {note}")

    print("\nMemory of the tracked state (PackedState path -> ETag), bytes per tracked object")
    row(
        "(a) state structure alone: sys.getsizeof of its parts",
        structure,
        f"= sorted key list {mem['key_list'] / per:.1f} (pointers) + ETag digests "
        f"{mem['digests'] / per:.1f} (16 bytes each)",
        f"+ unpacked ETags dict {mem['unpacked'] / per:.1f} ({mem['unpacked_entries']} entries):"
        " all the state holds but its key strings.",
    )
    row(
        "(b) total retained by the state: tracemalloc",
        retained,
        f"= (a) + key str {keys:.1f} ({mem['key_len']} chars) + {other:.1f} other",
        "(requested sizes), measured once the first listing and changeset are gone:",
        "the state keeps its own key strings, which no later listing (a new S3 response)",
        f"shares (state keys referenced from elsewhere: {mem['shared_keys']}), and no ETag str",
        f"(a listing's {mem['etag_len']}-char ETag str: {etag_strs:.1f}; a dict state kept one).",
    )
    row("(b) with pymalloc's 16-byte rounding of the key strings", alloc)
    row(
        "RSS retained after dropping the first listing",
        rss["retained"] / per,
        "an upper bound: includes pool space the listing freed, which the next reuses.",
    )
    row(
        "RSS beyond the listing: RSS(state + listing) - RSS(listing)",
        rss["beyond_listing"] / per,
        "the state's real cost during a later poll, next to a fresh listing; includes",
        "C-heap memory freed by the first poll (its events and delta) not yet",
        "returned to the OS, which later polls' large allocations reuse.",
    )
    row("the same, after malloc_trim(0): live memory only", rss["beyond_listing_trimmed"] / per)
    row("for scale, the listing itself: tracemalloc", mem["listing"] / per)
    row("for scale, the listing itself: RSS", rss["listing"] / per)

    print("\nExtra memory during a diff, over the state and the listing, bytes per object")
    row("no-change diff: tracemalloc peak", mem["nochange_peak"] / per)
    row("no-change diff: kept by the changeset", mem["nochange_kept"] / per)
    hwm = "VmHWM" if rss["hwm"] else "RSS after"
    row(f"no-change diff: RSS growth ({hwm})", rss["diff_peak"] / per)
    row("1% changes diff: tracemalloc peak", mem["changed_peak"] / per)
    row("1% changes diff: kept by the changeset (events, delta)", mem["changed_kept"] / per)

    cpu_limit = CPU_TARGET_S_PER_MILLION * n / 1e6
    nochange_best = min(cpu["nochange"])
    verdicts = [
        (
            f"no-change diff CPU < {cpu_limit:.3g} s",
            nochange_best < cpu_limit,
            f"best {nochange_best:.3f} s",
        ),
        (
            f"(a) state structure < {MEMORY_TARGET_B:.0f} B/object",
            structure < MEMORY_TARGET_B,
            f"{structure:.1f}",
        ),
        (
            f"(b) state incl. strings < {MEMORY_TARGET_B:.0f} B/object",
            retained < MEMORY_TARGET_B,
            f"{retained:.1f} (key strings alone {keys:.1f})",
        ),
    ]
    print("\nTargets (scaled to N per object)")
    for label, ok, value in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'}  {label:42} {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--objects", type=int, default=1_000_000, help="tracked objects")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--phase", choices=["cpu", "tracemalloc", "rss"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n, repeat = args.objects, args.repeat
    if n < CHANGE_PERIOD or repeat < 1:
        parser.error(f"--objects must be >= {CHANGE_PERIOD} and --repeat >= 1")
    if args.phase == "cpu":
        print(json.dumps(phase_cpu(n, repeat)))
    elif args.phase == "tracemalloc":
        print(json.dumps(phase_tracemalloc(n)))
    elif args.phase == "rss":
        print(json.dumps(phase_rss(n)))
    else:
        return report(n, repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
