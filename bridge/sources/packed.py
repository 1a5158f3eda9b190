"""``PackedState``: an object listing's path -> ETag state, in key order, ETags packed.

With 36-character paths, a tracked object costs about 110 bytes, ~200 in a ``dict[str, str]``:

* ``key_list``: the paths, sorted (code-point order, which is UTF-8 byte order: the order S3
  lists keys in), one pointer each plus the path string;
* ``digests``: one ``bytearray``, 16 bytes per path, in the same order: the ETag's bytes when it
  is exactly 32 lowercase hex digits (S3's ETag of a single-part upload, ``MemoryStore``'s);
* ``unpacked``: a small dict of the ETags that do not round-trip through 16 bytes (multipart
  ``<hex>-<parts>``, the ``<mtime>-<size>`` of earlier ``LocalStore`` versions, quoted, upper
  case, anything else); their slot in ``digests`` is 16 zero bytes. The all-zero ETag is kept
  there too, so a zero slot always means "see ``unpacked``".

Every ETag reads back exactly as it was set (event ids are derived from it). Updates come as
changeset deltas, applied in one merge (:meth:`PackedState.apply`); lookups by path bisect.
The listing diff (:class:`~bridge.sources.objects.ListingDiff`) merges a key-ordered listing with
the arrays directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView

__all__ = [
    "DIGEST_SIZE",
    "EMPTY_SLOT",
    "EMPTY_SLOT_HEX",
    "PackedState",
    "empty_slots",
    "pack_etags",
]

DIGEST_SIZE = 16
EMPTY_SLOT = bytes(DIGEST_SIZE)
"""The slot of an ETag kept in ``PackedState.unpacked``."""
EMPTY_SLOT_HEX = EMPTY_SLOT.hex()
_CHUNK = 4096  # entries decoded at a time when iterating values


class PackedState(Mapping[str, str]):
    """Path -> ETag, sorted by path, ETags packed (see the module's docstring).

    A read-only ``Mapping`` (what ``state()`` returns); :meth:`apply` is the one way to change
    it. ``PackedState(mapping)`` copies any mapping of path -> ETag.
    """

    __slots__ = ("digests", "generation", "key_list", "unpacked")

    def __init__(self, state: Mapping[str, str] | None = None) -> None:
        self.key_list: list[str]
        self.digests: bytearray
        self.unpacked: dict[str, str]
        self.generation = 0
        """Counts the changes (:meth:`apply`); a diff in progress checks it has not moved."""
        if isinstance(state, PackedState):
            self.key_list = list(state.key_list)
            self.digests = bytearray(state.digests)
            self.unpacked = dict(state.unpacked)
            return
        self.key_list = sorted(state) if state else []
        etags = [state[key] for key in self.key_list] if state else []
        packed, loose = pack_etags(etags)
        self.digests = bytearray(packed)
        self.unpacked = {self.key_list[i]: etags[i] for i in loose}

    # -- Mapping ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.key_list)

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_list)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.index(key) >= 0

    def __getitem__(self, key: str) -> str:
        index = self.index(key) if isinstance(key, str) else -1
        if index < 0:
            raise KeyError(key)
        return self.etag_at(index)

    def items(self) -> ItemsView[str, str]:
        return _Items(self)

    def values(self) -> ValuesView[str]:
        return _Values(self)

    def __repr__(self) -> str:
        return f"<PackedState: {len(self)} entries, {len(self.unpacked)} unpacked>"

    # -- access by position ----------------------------------------------------------------

    def index(self, key: str) -> int:
        """The position of ``key`` in :attr:`key_list`, or -1."""
        keys = self.key_list
        i = bisect_left(keys, key)
        return i if i < len(keys) and keys[i] == key else -1

    def etag_at(self, index: int) -> str:
        """The ETag of the path at ``index`` (0 <= index < len), exactly as it was set."""
        start = index * DIGEST_SIZE
        digest = self.digests[start : start + DIGEST_SIZE]
        if digest == EMPTY_SLOT:
            return self.unpacked[self.key_list[index]]
        return digest.hex()

    def _iter_items(self) -> Iterator[tuple[str, str]]:
        keys, digests, unpacked = self.key_list, self.digests, self.unpacked
        generation = self.generation
        width = 2 * DIGEST_SIZE
        for start in range(0, len(keys), _CHUNK):
            if self.generation != generation:
                raise RuntimeError("PackedState changed during iteration")
            hexes = digests[start * DIGEST_SIZE : (start + _CHUNK) * DIGEST_SIZE].hex()
            for offset, key in enumerate(keys[start : start + _CHUNK]):
                etag = hexes[offset * width : (offset + 1) * width]
                yield key, unpacked[key] if etag == EMPTY_SLOT_HEX else etag

    # -- changes ---------------------------------------------------------------------------

    def apply(self, delta: Mapping[str, str | None]) -> None:
        """Set (a string) or delete (``None``) entries: a changeset's delta.

        One merge: O(k log n) to place the k entries, plus one copy of the arrays from the
        first inserted or deleted path on (no copy when every path is set in place or appended
        after the last one, as a first listing committed batch by batch is).
        """
        if not delta:
            return
        self.generation += 1
        keys, digests, unpacked = self.key_list, self.digests, self.unpacked
        paths = sorted(delta)
        values = [delta[path] for path in paths]
        etags = [value for value in values if value is not None]
        if not keys or paths[0] > keys[-1]:  # all after the last path: append
            if len(etags) < len(paths):  # deleting paths that are not there: nothing to do
                paths = [path for path, etag in zip(paths, values, strict=True) if etag is not None]
            packed, loose_at = pack_etags(etags)
            keys.extend(paths)
            digests += packed
            unpacked.update((paths[i], etags[i]) for i in loose_at)
            return
        n = len(keys)
        places: list[int] = []  # where each change goes in the current arrays
        found: list[bool] = []  # whether its path is there
        lo = 0
        for path in paths:
            lo = bisect_left(keys, path, lo)
            places.append(lo)
            found.append(lo < n and keys[lo] == path)
        packed, loose_at = pack_etags(etags)
        loose = set(loose_at)

        first = len(paths)  # the first change that inserts or deletes
        q = 0  # the next of etags / packed
        for c, value in enumerate(values):
            if value is None:
                if found[c]:
                    first = c
                    break
                continue  # deleting a missing path: nothing to do
            if not found[c]:
                first = c
                break
            at = places[c] * DIGEST_SIZE  # set in place
            digests[at : at + DIGEST_SIZE] = packed[q * DIGEST_SIZE : (q + 1) * DIGEST_SIZE]
            self._set_unpacked(paths[c], value if q in loose else None)
            q += 1
        if first == len(paths):
            return

        # From the first insertion or deletion on, rebuild: old segments and new entries merged.
        cut = places[first]
        old_keys = keys[cut:]
        old_digests = digests[cut * DIGEST_SIZE :]
        del keys[cut:]
        del digests[cut * DIGEST_SIZE :]
        with memoryview(old_digests) as old, memoryview(packed) as new:
            cursor = 0  # the next entry of old_keys to copy
            run_keys: list[str] = []  # new entries not copied yet: etags[run_start:q]
            run_start = q
            for c in range(first, len(paths)):
                path, value = paths[c], values[c]
                j = places[c] - cut
                if j > cursor:  # copy the new entries so far, then the old ones before this
                    keys.extend(run_keys)
                    digests += new[run_start * DIGEST_SIZE : q * DIGEST_SIZE]
                    run_keys, run_start = [], q
                    keys.extend(old_keys[cursor:j])
                    digests += old[cursor * DIGEST_SIZE : j * DIGEST_SIZE]
                    cursor = j
                if found[c]:
                    cursor = j + 1  # replaced or deleted
                if value is None:
                    if unpacked:
                        unpacked.pop(path, None)
                    continue
                run_keys.append(path)
                self._set_unpacked(path, value if q in loose else None)
                q += 1
            keys.extend(run_keys)
            digests += new[run_start * DIGEST_SIZE : q * DIGEST_SIZE]
            keys.extend(old_keys[cursor:])
            digests += old[cursor * DIGEST_SIZE :]

    def _set_unpacked(self, key: str, etag: str | None) -> None:
        """Record ``key``'s ETag in :attr:`unpacked`, or (None) that it is not there."""
        if etag is not None:
            self.unpacked[key] = etag
        elif self.unpacked:
            self.unpacked.pop(key, None)


def pack_etags(etags: Sequence[str]) -> tuple[bytes, list[int]]:
    """The 16-byte slots of ``etags``, and the indices of those that do not pack (their slot is
    :data:`EMPTY_SLOT`): all of them in one pass when they are all 32 lowercase hex digits."""
    joined = " ".join(etags)
    try:
        packed = bytes.fromhex(joined)  # skips the spaces
    except ValueError:
        pass
    else:  # reads back the same: each one was exactly 32 lowercase hex digits
        if len(packed) == DIGEST_SIZE * len(etags) and packed.hex(" ", DIGEST_SIZE) == joined:
            return packed, empty_slots(packed)
    slots = bytearray()
    loose: list[int] = []
    for i, etag in enumerate(etags):
        digest = _pack(etag)
        if digest is None:
            loose.append(i)
            slots += EMPTY_SLOT
        else:
            slots += digest
    return bytes(slots), loose


def _pack(etag: str) -> bytes | None:
    """The 16 bytes of an ETag of exactly 32 lowercase hex digits, not all zero; else None."""
    if len(etag) != 2 * DIGEST_SIZE:
        return None
    try:
        digest = bytes.fromhex(etag)
    except ValueError:
        return None
    if len(digest) != DIGEST_SIZE or digest == EMPTY_SLOT or digest.hex() != etag:
        return None
    return digest


def empty_slots(packed: bytes) -> list[int]:
    """Indices of the all-zero slots (ETags of 32 zeros, kept unpacked)."""
    found: list[int] = []
    start = 0
    while (at := packed.find(EMPTY_SLOT, start)) >= 0:
        if at % DIGEST_SIZE:
            start = (at // DIGEST_SIZE + 1) * DIGEST_SIZE  # not on a slot boundary
            continue
        found.append(at // DIGEST_SIZE)
        start = at + DIGEST_SIZE
    return found


class _Items(ItemsView[str, str]):
    __slots__ = ("_state",)

    def __init__(self, state: PackedState) -> None:
        super().__init__(state)
        self._state = state

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self._state._iter_items()


class _Values(ValuesView[str]):
    __slots__ = ("_state",)

    def __init__(self, state: PackedState) -> None:
        super().__init__(state)
        self._state = state

    def __iter__(self) -> Iterator[str]:
        return (etag for _, etag in self._state._iter_items())
