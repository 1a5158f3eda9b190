"""``FileStateStore``: checkpoints as one append-only journal file per source.

``<folder>/<source>.jsonl`` holds JSON lines, each fsynced before the call returns:

* ``{"v": 1, "rev": N, "delta": {...}}``: a commit (``"snapshot": true``: the delta is the
  whole state; written when the journal is compacted);
* ``{"v": 1, "intent": {"rev": N, "delta": {...}}}``: a batch about to be published; the next
  commit line settles it.

An intent line is fsynced before the call returns (its batch is published next); a commit line
is written but not fsynced on its own: the next intent's fsync makes it durable with it, and a
commit lost meanwhile (power loss) leaves its intent pending, which the next start settles by a
replay poll with the same event ids. A commit that records the next batch's intent is one
write and one fsync.

Loading replays the lines. When the journal holds more delta entries than twice the state's
size (plus a margin), a commit rewrites it as one snapshot, atomically. A torn last line (a
crash mid-write) is dropped; any other unreadable line is a StateError naming the file and
line, and the source then starts from an empty state (a full poll resyncs it).

One folder serves one process: the service opens it with ``exclusive=True``, which takes an
exclusive lock (``flock``) on ``<folder>/.lock`` for as long as the store is open (released by
:meth:`FileStateStore.aclose`, or when the process ends, however it ends). A second process
given the same folder is refused with a :class:`~bridge.errors.StateError` naming the folder
and the process holding it: two bridges writing one journal would overwrite each other's
checkpoints (several replicas need ``leader_election``, whose state is in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

from bridge.errors import StateError
from bridge.sources.base import StateDelta
from bridge.state import (
    Checkpoint,
    Intent,
    apply_delta,
    intent_from_record,
    intent_to_record,
)
from bridge.state.codec import dumps, loads

__all__ = ["FileStateStore"]

FORMAT_VERSION = 1
LOCK_FILE = ".lock"
_COMPACT_MARGIN = 1000


class FileStateStore:
    """Checkpoints in a local folder, for a single replica."""

    def __init__(self, folder: str | os.PathLike[str], *, exclusive: bool = False) -> None:
        """``exclusive``: lock the folder for this process (see the module docstring); raises
        StateError when another process holds it."""
        self.folder = Path(folder)
        self._written: dict[str, int] = {}  # delta entries in the journal, per source
        self._sizes: dict[str, int] = {}  # state entries at the last load or snapshot
        self._lock_fd: int | None = None
        if exclusive:
            self._lock_fd = _lock(self.folder)

    def path(self, source_name: str) -> Path:
        return self.folder / f"{source_name}.jsonl"

    async def load(self, source_name: str) -> Checkpoint | None:
        return await asyncio.to_thread(self._load, source_name)

    async def begin(self, source_name: str, intent: Intent) -> None:
        record = {"v": FORMAT_VERSION, "intent": intent_to_record(intent)}
        await asyncio.to_thread(self._append, source_name, [record], len(intent.delta), True)

    async def commit(
        self,
        source_name: str,
        revision: int,
        delta: StateDelta,
        next_intent: Intent | None = None,
    ) -> None:
        await asyncio.to_thread(self._commit, source_name, revision, delta, next_intent)

    async def reset(self, source_name: str) -> None:
        path = self.path(source_name)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot delete checkpoint {str(path)!r}: {exc}") from exc
        self._written.pop(source_name, None)
        self._sizes.pop(source_name, None)

    async def aclose(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the lock

    def _load(self, source_name: str) -> Checkpoint | None:
        path = self.path(source_name)
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
        checkpoint, torn, written = self._replay(path, lines)
        if torn:  # rewrite without the torn line, so later appends start on a clean line
            self._rewrite(path, checkpoint)
            written = len(checkpoint.state) + len(
                checkpoint.intent.delta if checkpoint.intent else ()
            )
        self._written[source_name] = written
        self._sizes[source_name] = len(checkpoint.state)
        return checkpoint

    @staticmethod
    def _replay(path: Path, lines: list[bytes]) -> tuple[Checkpoint, bool, int]:
        """Fold the journal; also says whether the last line was torn (and so ignored) and how
        many delta entries the journal holds."""
        checkpoint = Checkpoint()
        written = 0
        for number, line in enumerate(lines, 1):
            try:
                record: dict[str, Any] = loads(line)
                if record.get("v") != FORMAT_VERSION:
                    raise ValueError(f"format version {record.get('v')!r}, expected 1")
                if "intent" in record:
                    checkpoint.intent = intent_from_record(record["intent"])
                    written += len(checkpoint.intent.delta)
                    continue
                if record.get("snapshot"):
                    checkpoint.state = {}
                apply_delta(checkpoint.state, record["delta"])
                written += len(record["delta"])
                checkpoint.revision = int(record["rev"])
                checkpoint.intent = None
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if number == len(lines):  # torn write of the last line: it never happened
                    return checkpoint, True, written
                raise StateError(
                    f"checkpoint {str(path)!r} line {number} is unreadable ({exc}); "
                    "delete the file to resync the source from a full poll"
                ) from exc
        return checkpoint, False, written

    def _append(
        self, source_name: str, records: list[dict[str, Any]], entries: int, sync: bool
    ) -> None:
        path = self.path(source_name)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as journal:
                journal.write(b"".join(dumps(record) + b"\n" for record in records))
                journal.flush()
                if sync:
                    os.fsync(journal.fileno())
        except OSError as exc:
            raise StateError(f"cannot write checkpoint {str(path)!r}: {exc}") from exc
        self._written[source_name] = self._written.get(source_name, 0) + entries + len(records)

    def _commit(
        self, source_name: str, revision: int, delta: StateDelta, next_intent: Intent | None
    ) -> None:
        path = self.path(source_name)
        written = self._written.get(source_name, 0)
        if written > 2 * self._sizes.get(source_name, 0) + _COMPACT_MARGIN:
            try:
                checkpoint, _, _ = self._replay(path, path.read_bytes().splitlines())
                apply_delta(checkpoint.state, delta)
                checkpoint.revision, checkpoint.intent = revision, next_intent
                self._rewrite(path, checkpoint)
            except OSError as exc:
                raise StateError(f"cannot compact checkpoint {str(path)!r}: {exc}") from exc
            self._written[source_name] = len(checkpoint.state)
            self._sizes[source_name] = len(checkpoint.state)
            return
        records = [{"v": FORMAT_VERSION, "rev": revision, "delta": delta}]
        entries = len(delta)
        if next_intent is not None:
            records.append({"v": FORMAT_VERSION, "intent": intent_to_record(next_intent)})
            entries += len(next_intent.delta)
        self._append(source_name, records, entries, sync=next_intent is not None)

    @staticmethod
    def _rewrite(path: Path, checkpoint: Checkpoint) -> None:
        """Replace the journal by one snapshot line (the intent, if any, is kept after it)."""
        lines = [
            {
                "v": FORMAT_VERSION,
                "rev": checkpoint.revision,
                "snapshot": True,
                "delta": checkpoint.state,
            }
        ]
        if checkpoint.intent is not None:
            lines.append({"v": FORMAT_VERSION, "intent": intent_to_record(checkpoint.intent)})
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for line in lines:
                out.write(dumps(line) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)


def _lock(folder: Path) -> int:
    """Lock ``folder`` for this process; the open descriptor of its lock file holds the lock."""
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StateError(
            f"cannot open the lock file {str(path)!r} of the state folder: {exc}"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f" (pid {int(os.pread(fd, 32, 0))})"
        os.close(fd)
        raise StateError(
            f"state folder {str(folder)!r} is in use: another process{holder} holds its lock "
            f"{str(path)!r}. Two bridges must not share one state.path (they would overwrite "
            "each other's checkpoints): give each its own, or run replicas with leader_election"
        ) from exc
    except OSError as exc:  # a file system without locks
        os.close(fd)
        raise StateError(f"cannot lock {str(path)!r} of the state folder: {exc}") from exc
    with contextlib.suppress(OSError):  # who holds it, for the message above (best effort)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
