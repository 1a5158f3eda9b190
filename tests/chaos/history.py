"""The true history of the sources, the faults injected, and the check of what was delivered.

The product's guarantee (README, DESIGN §3-4): *polling observes states, not every transition*:
a change undone before the next poll is no event. *Nothing lost*: every state that holds for a
full interval while some replica can lead is published, a removal is never missed, and the final
state always reaches consumers. *Nothing doubled*: a re-derived event has the same id and the
broker drops the copy.

:class:`Truth` records every state of every item (a version, or ``None`` for absent) with the
time it held from (after the change that made it completed) to the time the next change began.
:class:`Faults` records when a fault was active, from its start until the system demonstrably
recovered (see ``tests/chaos/test_chaos.py``). :func:`check_item` compares one item's delivered
events with its true states:

1. **Consistent**: ``Added`` only of an item the consumer holds as absent, ``Modified`` only of
   a present one and to another version, ``Removed`` only of a present one, carrying the version
   the consumer holds.
2. **In order, never invented**: the states the events lead through are a subsequence of the
   true states. Every version is unique (each change writes new content), so this also rules out
   a change delivered twice, out of order, or one that never held.
3. **Nothing lost**: a state that held for at least ``hold_s`` (a few poll intervals) *outside
   every fault window* was delivered. For a version that means an event carrying it; for an
   absence (a removal) a ``Removed`` between the delivered neighbours of that absence (two
   absences separated only by a version nobody saw are one absence to a poller).
4. **Final state**: the consumer's last state of the item is the item's final true state.

Faults make states skippable, never reorderable or duplicable: during a Redis outage or while a
killed or frozen leader still holds its lease no replica can lead, and during a broker outage a
failed batch is replayed (its events again, same ids, then what changed since) rather than
polled past, so a state seen by a poll that could not publish may be skipped, never reordered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "Delivered",
    "Fault",
    "Faults",
    "ItemReport",
    "State",
    "Truth",
    "check_item",
    "free_stretch",
]

Item = tuple[str, str]
"""(source name, subject): the S3 object path, or the URL of an HTTP source."""


@dataclass(slots=True)
class State:
    """One true state of an item: ``version`` (None: absent) from ``since`` to ``until``."""

    version: str | None
    since: float
    until: float = math.inf
    """When the change that ended it began (inf: it still holds)."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """One event of an item, as the independent consumer read it."""

    kind: str
    """``added``, ``modified`` or ``removed``."""
    version: str
    """The version it carries (for ``removed``: the last version)."""
    id: str


class Truth:
    """Every item's true states, recorded by the code that changes the sources."""

    def __init__(self) -> None:
        self.items: dict[Item, list[State]] = {}

    def add_item(self, item: Item) -> None:
        self.items[item] = [State(None, -math.inf)]

    def record(self, item: Item, version: str | None, began: float, ended: float) -> None:
        """A change of ``item`` to ``version`` that began and completed at those times."""
        states = self.items[item]
        if states[-1].version == version:
            raise ValueError(f"{item}: a change to the state it has ({version})")
        states[-1].until = began
        states.append(State(version, ended))

    def current(self, item: Item) -> str | None:
        return self.items[item][-1].version

    def since(self, item: Item, version: str) -> float | None:
        """When ``version`` of ``item`` began to hold (None: never)."""
        for state in self.items[item]:
            if state.version == version:
                return state.since
        return None

    @property
    def changes(self) -> int:
        return sum(len(states) - 1 for states in self.items.values())


@dataclass(slots=True)
class Fault:
    kind: str
    target: str
    start: float
    end: float = math.inf
    """When the system had recovered (inf: not yet)."""
    lifted: float = math.inf
    """When the fault itself was undone (restart, SIGCONT...)."""


class Faults:
    """The faults of one run, each a window in which states may be skipped."""

    def __init__(self) -> None:
        self.windows: list[Fault] = []

    def open(self, kind: str, target: str, at: float) -> Fault:
        fault = Fault(kind, target, at)
        self.windows.append(fault)
        return fault

    def count(self, kind: str) -> int:
        return sum(f.kind == kind for f in self.windows)


def free_stretch(since: float, until: float, windows: Sequence[Fault]) -> float:
    """The longest part of ``[since, until)`` outside every fault window."""
    spans = sorted((f.start, f.end) for f in windows if f.end > since and f.start < until)
    longest = 0.0
    cursor = since
    for start, end in spans:
        if start > cursor:
            longest = max(longest, start - cursor)
        cursor = max(cursor, end)
        if cursor >= until:
            return longest
    return max(longest, until - cursor)


@dataclass(slots=True)
class ItemReport:
    item: Item
    errors: list[str] = field(default_factory=list)
    events: int = 0
    true_states: int = 0
    must: int = 0
    """States that had to be delivered (held long enough outside fault windows)."""
    skipped: int = 0
    """States not delivered that were allowed to be skipped (short, or during a fault)."""


def check_item(
    item: Item,
    states: Sequence[State],
    delivered: Sequence[Delivered],
    windows: Sequence[Fault],
    *,
    hold_s: float,
) -> ItemReport:
    """Check one item's delivered events against its true states (see the module docstring).

    ``states`` starts with the absent state before the item first existed.
    """
    report = ItemReport(item, events=len(delivered), true_states=len(states) - 1)
    errors = report.errors

    # 1. consistency, as the consumer folds the events
    held: str | None = None
    path: list[str | None] = []  # the states the events lead through
    for n, event in enumerate(delivered):
        where = f"event {n} ({event.kind} {event.version[:24]}, id {event.id[:12]})"
        if event.kind == "added":
            if held is not None:
                errors.append(f"{where}: Added while the consumer holds {held[:24]}")
            held = event.version
        elif event.kind == "modified":
            if held is None:
                errors.append(f"{where}: Modified of an item the consumer holds as absent")
            elif held == event.version:
                errors.append(f"{where}: Modified to the version the consumer holds")
            held = event.version
        elif event.kind == "removed":
            if held is None:
                errors.append(f"{where}: Removed of an item the consumer holds as absent")
            elif held != event.version:
                errors.append(f"{where}: Removed carries another version than {held[:24]}")
            held = None
        else:
            errors.append(f"{where}: unknown kind")
        path.append(held)

    # 2. a subsequence of the true states (greedy matching is exact for subsequences)
    truth = [s.version for s in states]
    position = 0  # the initial absent state; events start after it
    matched: list[int] = []
    for n, step in enumerate(path):
        found = next((i for i in range(position + 1, len(truth)) if truth[i] == step), None)
        if found is None:
            never = step is not None and step not in truth
            errors.append(
                f"event {n} ({delivered[n].kind} {delivered[n].version[:24]}) leads to "
                + (
                    "a version the item never had"
                    if never
                    else f"state {_short(step)}, which is not after state {position} in the "
                    f"true history (out of order or doubled)"
                )
            )
            break
        position = found
        matched.append(found)

    # 3. nothing lost
    delivered_versions = {s for s in path if s is not None}
    # Where each delivered version sits in the true history and in the delivered path.
    true_index = {v: i for i, v in enumerate(truth) if v is not None}
    path_index = {v: i for i, v in enumerate(path) if v is not None}
    for i in range(1, len(states) - 1):  # the final state is checked below
        state = states[i]
        must = free_stretch(state.since, state.until, windows) >= hold_s
        if state.version is not None:
            seen = state.version in delivered_versions
        else:
            seen = _absence_delivered(i, truth, path, true_index, path_index)
        report.must += must
        report.skipped += not seen
        if must and not seen:
            errors.append(
                f"state {i} ({_short(state.version)}) held {state.until - state.since:.2f} s, "
                f"{free_stretch(state.since, state.until, windows):.2f} s of it outside every "
                f"fault window, and was never delivered"
            )

    # 4. the final state
    final = states[-1].version
    last = path[-1] if path else None
    if last != final:
        errors.append(f"the consumer ends with {_short(last)}, the item with {_short(final)}")
    report.must += 1
    return report


def _absence_delivered(
    i: int,
    truth: Sequence[str | None],
    path: Sequence[str | None],
    true_index: dict[str, int],
    path_index: dict[str, int],
) -> bool:
    """Whether the absence at true index ``i`` reached the consumer as a ``Removed``: one between
    the delivered versions just before and just after it. Before any delivered version there is
    nothing to remove: the consumer holds the item as absent already."""
    before = max(
        (true_index[v] for v in path_index if true_index.get(v, len(truth)) < i), default=None
    )
    if before is None:
        return True
    after = min((true_index[v] for v in path_index if true_index.get(v, -1) > i), default=None)
    start = path_index[truth[before]]  # type: ignore[index]
    stop = len(path) if after is None else path_index[truth[after]]  # type: ignore[index]
    return any(s is None for s in path[start + 1 : stop])


def _short(version: str | None) -> str:
    return "absent" if version is None else version[:24]
