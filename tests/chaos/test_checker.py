"""The chaos suite's checker (tests/chaos/history.py) on hand-made histories: it accepts what
the guarantees allow and flags what they rule out, so a passing chaos run means something."""

from __future__ import annotations

import math

import pytest

from tests.chaos.history import Delivered, Fault, Faults, State, Truth, check_item, free_stretch

ITEM = ("src", "key")
HOLD_S = 1.0


def states(*spec: tuple[str | None, float, float]) -> list[State]:
    """The initial absence, then (version, since, until) triples; the last one holds on."""
    out = [State(None, -math.inf, spec[0][1])]
    out += [State(v, a, b) for v, a, b in spec]
    out[-1].until = math.inf
    return out


def events(*spec: tuple[str, str]) -> list[Delivered]:
    return [Delivered(kind, version, f"id-{n}") for n, (kind, version) in enumerate(spec)]


def errors(
    truth: list[State], delivered: list[Delivered], windows: tuple[Fault, ...] = ()
) -> list[str]:
    return check_item(ITEM, truth, delivered, windows, hold_s=HOLD_S).errors


HISTORY = states(("v1", 0, 2), ("v2", 2, 4), (None, 4, 6), ("v3", 6, 8))
"""Every state held 2 s, long enough to be seen."""


def test_everything_delivered_in_order_is_accepted() -> None:
    delivered = events(("added", "v1"), ("modified", "v2"), ("removed", "v2"), ("added", "v3"))
    report = check_item(ITEM, HISTORY, delivered, (), hold_s=HOLD_S)
    assert report.errors == []
    assert (report.must, report.skipped, report.events) == (4, 0, 4)


def test_a_state_held_long_outside_faults_must_be_delivered() -> None:
    delivered = events(("added", "v1"), ("removed", "v1"), ("added", "v3"))
    assert any("state 2 (v2)" in e and "never delivered" in e for e in errors(HISTORY, delivered))


def test_a_short_state_may_be_skipped() -> None:
    truth = states(("v1", 0, 2), ("v2", 2, 2.1), ("v3", 2.1, 5))
    assert errors(truth, events(("added", "v1"), ("modified", "v3"))) == []


def test_a_state_during_a_fault_may_be_skipped() -> None:
    fault = Fault("kill", "r1", 1.5, end=4.5)
    delivered = events(("added", "v1"), ("removed", "v1"), ("added", "v3"))
    assert errors(HISTORY, delivered, (fault,)) == []


def test_a_state_longer_than_its_fault_must_be_delivered() -> None:
    truth = states(("v1", 0, 2), ("v2", 2, 6), ("v3", 6, 8))
    fault = Fault("pause", "r1", 1.5, end=3.0)  # v2 then holds 3 s more outside the fault
    assert (
        "never delivered" in errors(truth, events(("added", "v1"), ("modified", "v3")), (fault,))[0]
    )


def test_a_long_removal_must_be_delivered_not_folded_into_a_modification() -> None:
    delivered = events(("added", "v1"), ("modified", "v2"), ("modified", "v3"))
    assert any("state 3 (absent)" in e for e in errors(HISTORY, delivered))


def test_two_absences_around_an_unseen_version_need_one_removal() -> None:
    truth = states(("v1", 0, 2), (None, 2, 4), ("v2", 4, 4.1), (None, 4.1, 6), ("v3", 6, 8))
    delivered = events(("added", "v1"), ("removed", "v1"), ("added", "v3"))
    assert errors(truth, delivered) == []


def test_a_doubled_change_is_flagged() -> None:
    delivered = events(("added", "v1"), ("modified", "v2"), ("modified", "v2"))
    found = errors(HISTORY, delivered)
    assert any("Modified to the version the consumer holds" in e for e in found)


def test_a_change_out_of_order_is_flagged() -> None:
    delivered = events(("added", "v2"), ("modified", "v1"))
    assert any("out of order or doubled" in e for e in errors(HISTORY, delivered))


def test_a_version_that_never_held_is_flagged() -> None:
    delivered = events(("added", "v1"), ("modified", "v9"))
    assert any("never had" in e for e in errors(HISTORY, delivered))


@pytest.mark.parametrize(
    ("delivered", "problem"),
    [
        ([("added", "v1"), ("added", "v2")], "Added while the consumer holds"),
        ([("modified", "v1")], "Modified of an item the consumer holds as absent"),
        ([("removed", "v1")], "Removed of an item the consumer holds as absent"),
        ([("added", "v1"), ("removed", "v2")], "Removed carries another version"),
    ],
)
def test_inconsistent_kinds_are_flagged(delivered: list[tuple[str, str]], problem: str) -> None:
    assert any(problem in e for e in errors(HISTORY, events(*delivered)))


def test_the_final_state_must_be_reached_even_right_after_a_fault() -> None:
    truth = states(("v1", 0, 2), ("v2", 2, 2.1))
    fault = Fault("redis", "redis-server", 1.0, end=math.inf)
    found = errors(truth, events(("added", "v1")), (fault,))
    assert found == ["the consumer ends with v1, the item with v2"]


def test_free_stretch_subtracts_overlapping_windows() -> None:
    windows = [Fault("a", "", 1, end=2), Fault("b", "", 1.5, end=3), Fault("c", "", 5, end=6)]
    assert free_stretch(0, 10, windows) == 4  # 6..10
    assert free_stretch(1.2, 2.8, windows) == 0
    assert free_stretch(2, 5.5, windows) == 2  # 3..5
    assert free_stretch(0, math.inf, []) == math.inf


def test_truth_records_changes_and_refuses_a_non_change() -> None:
    truth = Truth()
    truth.add_item(ITEM)
    truth.record(ITEM, "v1", 1.0, 1.1)
    truth.record(ITEM, None, 2.0, 2.2)
    assert [(s.version, s.since, s.until) for s in truth.items[ITEM]] == [
        (None, -math.inf, 1.0),
        ("v1", 1.1, 2.0),
        (None, 2.2, math.inf),
    ]
    assert truth.since(ITEM, "v1") == 1.1
    assert truth.changes == 2
    with pytest.raises(ValueError, match="a change to the state it has"):
        truth.record(ITEM, None, 3.0, 3.0)
    faults = Faults()
    faults.open("kill", "r1", 1.0)
    assert faults.count("kill") == 1
