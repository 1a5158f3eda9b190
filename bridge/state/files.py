"""``FileStateStore``: checkpoints as one append-only journal file per source.

``<folder>/<source>.jsonl`` holds JSON lines ``{"v": 1, "rev": N, "delta": {...}}``; the first
line may be a snapshot (``"snapshot": true``, the delta is the whole state). Loading replays
the lines. Each commit appends one line and fsyncs it; when the journal has grown to more lines
than the state has entries (plus a margin) it is rewritten as one snapshot, atomically. A torn
last line (a crash mid-write) is ignored; any other unreadable line is a StateError naming the
file and line, and the source then starts from an empty state (a full poll resyncs it).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bridge.errors import StateError
from bridge.sources.base import StateDelta
from bridge.state import Checkpoint, apply_delta

__all__ = ["FileStateStore"]

FORMAT_VERSION = 1
_COMPACT_MARGIN = 1000


class FileStateStore:
    """Checkpoints in a local folder, for a single replica."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._lines: dict[str, int] = {}  # journal lines per source
        self._sizes: dict[str, int] = {}  # state entries at the last load or snapshot

    def _path(self, source_name: str) -> Path:
        return self.folder / f"{source_name}.jsonl"

    async def load(self, source_name: str) -> Checkpoint | None:
        return await asyncio.to_thread(self._load, source_name)

    async def commit(self, source_name: str, revision: int, delta: StateDelta) -> None:
        await asyncio.to_thread(self._commit, source_name, revision, delta)

    async def aclose(self) -> None:
        return None

    def _load(self, source_name: str) -> Checkpoint | None:
        path = self._path(source_name)
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
        checkpoint, torn = self._replay(path, lines)
        if torn:  # rewrite without the torn line, so later appends start on a clean line
            self._snapshot(path, checkpoint)
            lines = lines[:1]
        self._lines[source_name] = len(lines)
        self._sizes[source_name] = len(checkpoint.state)
        return checkpoint

    @staticmethod
    def _replay(path: Path, lines: list[bytes]) -> tuple[Checkpoint, bool]:
        """Fold the journal; also says whether the last line was torn (and so ignored)."""
        checkpoint = Checkpoint()
        for number, line in enumerate(lines, 1):
            try:
                record: dict[str, Any] = json.loads(line)
                if record.get("v") != FORMAT_VERSION:
                    raise ValueError(f"format version {record.get('v')!r}, expected 1")
                if record.get("snapshot"):
                    checkpoint.state = {}
                apply_delta(checkpoint.state, record["delta"])
                checkpoint.revision = int(record["rev"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if number == len(lines):  # torn write of the last commit: it never happened
                    return checkpoint, True
                raise StateError(
                    f"checkpoint {str(path)!r} line {number} is unreadable ({exc}); "
                    "delete the file to resync the source from a full poll"
                ) from exc
        return checkpoint, False

    def _commit(self, source_name: str, revision: int, delta: StateDelta) -> None:
        path = self._path(source_name)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lines = self._lines.get(source_name, 0)
            if lines > self._sizes.get(source_name, 0) + _COMPACT_MARGIN:
                checkpoint, _ = self._replay(path, path.read_bytes().splitlines())
                apply_delta(checkpoint.state, delta)
                checkpoint.revision = revision
                self._snapshot(path, checkpoint)
                self._lines[source_name] = 1
                self._sizes[source_name] = len(checkpoint.state)
                return
            record = {"v": FORMAT_VERSION, "rev": revision, "delta": delta}
            with path.open("ab") as journal:
                journal.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
                journal.flush()
                os.fsync(journal.fileno())
            self._lines[source_name] = lines + 1
        except OSError as exc:
            raise StateError(f"cannot write checkpoint {str(path)!r}: {exc}") from exc

    @staticmethod
    def _snapshot(path: Path, checkpoint: Checkpoint) -> None:
        record = {
            "v": FORMAT_VERSION,
            "rev": checkpoint.revision,
            "snapshot": True,
            "delta": checkpoint.state,
        }
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as out:
            out.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
