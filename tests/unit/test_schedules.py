"""Schedules as data, checked against hand-worked references (design.md) and invariants."""

from __future__ import annotations

import math

import pytest

from megatron_paci.pipeline.schedules import (
    SCHEDULES,
    Action,
    build_schedule,
    one_f_one_b,
    paci_bound,
    peak_in_flight,
    schedule_versions,
    two_bw_version,
    versions_seen,
)


def parse(text: str) -> list[Action]:
    """'F1 F2 B1 S1' -> actions, so expected lists read like the design notes."""
    kinds = {"F": "F", "B": "B", "S": "STEP"}
    return [Action(kinds[t[0]], int(t[1:])) for t in text.split()]


def cells(text: str) -> list[tuple[int, int]]:
    """'0/0 x4, 0/1 x3, 1/1' -> [(0, 0)] * 4 + [(0, 1)] * 3 + [(1, 1)]: design.md's notation."""
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        cell, _, rep = part.strip().partition(" x")
        f, b = cell.split("/")
        out += [(int(f), int(b))] * (int(rep) if rep else 1)
    return out


# ---------------------------------------------------------------------------------------
# design.md worked example: P = 4, a = m = M = 4, 3 windows; cells v_F/v_B for j = 1..12.
# ---------------------------------------------------------------------------------------
WORKED = {
    "1f1b_flush": {s: "0/0 x4, 1/1 x4, 2/2 x4" for s in range(4)},
    "pipedream_2bw": {s: "0/0 x8, 1/1 x4" for s in range(4)},
    "paci": {
        0: "0/0 x4, 0/1 x3, 1/1, 1/2 x3, 2/2",
        1: "0/0 x4, 0/1 x2, 1/1 x2, 1/2 x2, 2/2 x2",
        2: "0/0 x4, 0/1, 1/1 x3, 1/2, 2/2 x3",
        3: "0/0 x4, 1/1 x4, 2/2 x4",
    },
}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("stage", range(4))
def test_design_worked_example(name: str, stage: int) -> None:
    expected = cells(WORKED[name][stage])
    assert len(expected) == 12
    got = schedule_versions(name, 4, stage, 4, 3)
    assert list(got) == list(range(1, 13))
    assert list(got.values()) == expected


def test_paci_matches_design_formula_in_steady_order() -> None:
    # v_B = floor((j-1)/a), v_F = floor(max(0, j-(P-s))/a)
    for p in (2, 3, 4, 5):
        for a in (1, 2, 3, 4):
            for s in range(p):
                got = schedule_versions("paci", p, s, a, 5)
                for j, (vf, vb) in got.items():
                    assert vb == (j - 1) // a
                    assert vf == max(0, j - (p - s)) // a


# ---------------------------------------------------------------------------------------
# Action lists, written by hand.
# ---------------------------------------------------------------------------------------
HAND = {
    # P=2, M=2, 2 windows
    ("1f1b_flush", 2, 0): "F1 F2 B1 B2 S1 F3 F4 B3 B4 S2",
    ("1f1b_flush", 2, 1): "F1 B1 F2 B2 S1 F3 B3 F4 B4 S2",
    ("pipedream_2bw", 2, 0): "F1 F2 B1 F3 B2 S1 F4 B3 B4 S2",
    ("pipedream_2bw", 2, 1): "F1 B1 F2 B2 S1 F3 B3 F4 B4 S2",
    ("paci", 2, 0): "F1 F2 B1 F3 B2 S1 F4 B3 B4 S2",
    ("paci", 2, 1): "F1 B1 F2 B2 S1 F3 B3 F4 B4 S2",
}


@pytest.mark.parametrize("key", sorted(HAND))
def test_small_action_lists(key: tuple[str, int, int]) -> None:
    name, window, stage = key
    assert build_schedule(name, 2, stage, window, 2) == parse(HAND[key])


def test_paci_p3_stage0_m3() -> None:
    got = build_schedule("paci", 3, 0, 3, 2)
    assert got == parse("F1 F2 F3 B1 F4 B2 F5 B3 S1 F6 B4 B5 B6 S2")
    # F4, F5 ran before S1 but their backwards after it: one update crossed.
    assert versions_seen(got) == {1: (0, 0), 2: (0, 0), 3: (0, 0), 4: (0, 1), 5: (0, 1),
                                  6: (1, 1)}  # fmt: skip


def test_one_f_one_b_shapes() -> None:
    assert one_f_one_b(4, 0, 2) == parse("F1 F2 B1 B2")  # warm-up capped by N
    assert one_f_one_b(3, 1, 3, first=7) == parse("F7 F8 B7 F9 B8 B9")
    assert one_f_one_b(1, 0, 2) == parse("F1 B1 F2 B2")
    assert one_f_one_b(3, 0, 0) == []


def test_action_str() -> None:
    assert [str(a) for a in parse("F3 B3 S1")] == ["F3", "B3", "S1"]
    with pytest.raises(ValueError):
        Action("X", 1)


def test_first_window_continues_numbering() -> None:
    seg = build_schedule("paci", 2, 0, 2, 2, first_window=3)
    assert seg == parse("F5 F6 B5 F7 B6 S3 F8 B7 B8 S4")  # a fresh warm-up after a drain
    assert versions_seen(seg) == {5: (2, 2), 6: (2, 2), 7: (2, 3), 8: (3, 3)}
    flush = build_schedule("1f1b_flush", 2, 1, 2, 1, first_window=2)
    assert flush == parse("F3 B3 F4 B4 S2")
    assert schedule_versions("1f1b_flush", 2, 1, 2, 1, first_window=2) == {3: (1, 1), 4: (1, 1)}


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, match",
    [
        (("gpipe", 2, 0, 2, 1), "unknown pipeline.schedule 'gpipe'.*1f1b_flush, pipedream_2bw"),
        (("paci", 0, 0, 2, 1), "stages must be >= 1"),
        (("paci", 2, 2, 2, 1), "stage 2 out of range"),
        (("paci", 2, -1, 2, 1), "out of range"),
        (("paci", 2, 0, 0, 1), "a window of zero"),
        (("1f1b_flush", 2, 0, 0, 1), "a window of zero"),
        (("paci", 2, 0, 2, -1), "need num_windows >= 0"),
        (("pipedream_2bw", 4, 0, 2, 3), r"m >= P-1: .* = 2 < parallel.pipeline-1 = 3"),
    ],
)
def test_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_schedule(*args)


def test_2bw_accepts_m_equal_p_minus_1_and_paci_accepts_small_windows() -> None:
    build_schedule("pipedream_2bw", 4, 0, 3, 2)
    build_schedule("paci", 4, 0, 1, 2)


# ---------------------------------------------------------------------------------------
# Invariants over many shapes
# ---------------------------------------------------------------------------------------
def shapes():
    for name in SCHEDULES:
        for p in (1, 2, 3, 4, 5):
            for a in (1, 2, 3, 4, 8):
                if name == "pipedream_2bw" and a < p - 1:
                    continue
                for w in (0, 1, 3):
                    for s in range(p):
                        yield name, p, s, a, w


def test_every_action_once_and_in_order() -> None:
    for name, p, s, a, w in shapes():
        acts = build_schedule(name, p, s, a, w)
        where = {x: i for i, x in enumerate(acts)}
        assert len(where) == len(acts), (name, p, s, a, w)
        n = a * w
        assert len(acts) == 2 * n + w
        for j in range(1, n + 1):
            assert where[Action("F", j)] < where[Action("B", j)]
        for k in range(1, w + 1):
            assert where[Action("B", k * a)] < where[Action("STEP", k)]
            if k < w:
                assert where[Action("STEP", k)] < where[Action("B", k * a + 1)]
        if name != "1f1b_flush" and w:
            # the step follows the window's last backward at once
            for k in range(1, w + 1):
                assert acts[where[Action("STEP", k)] - 1] == Action("B", k * a)
        # forwards in stage-0 order, backwards likewise (1F1B never reorders)
        assert [x.index for x in acts if x.kind == "F"] == list(range(1, n + 1))
        assert [x.index for x in acts if x.kind == "B"] == list(range(1, n + 1))


def test_peak_in_flight() -> None:
    for name, p, s, a, w in shapes():
        peak = peak_in_flight(build_schedule(name, p, s, a, w))
        assert peak <= p - s
        if name == "1f1b_flush":
            assert peak <= min(p - s, a)
            assert peak == (min(p - s, a) if w else 0)
        elif w:
            assert peak == min(p - s, a * w)
    assert peak_in_flight(parse("F1 F2 B1 F3 F4 B2")) == 3


def test_paci_bound() -> None:
    for a in (1, 2, 3, 4, 8):
        for p in (2, 3, 4):
            for s in range(p):
                bound = paci_bound(p, s, a)
                assert bound == math.ceil((p - s - 1) / a)
                for w in (1, 2, 6):
                    got = schedule_versions("paci", p, s, a, w)
                    crossed = max(vb - vf for vf, vb in got.values())
                    assert crossed <= bound
                    if w == 6:  # enough windows for the worst case to occur
                        assert crossed == bound, (a, p, s)
                    if a >= p - 1:
                        assert crossed <= 1
    assert paci_bound(4, 0, 1) == 3 and paci_bound(4, 3, 1) == 0


def test_flush_never_crosses_an_update() -> None:
    for p in (1, 2, 3, 4):
        for a in (1, 2, 5):
            for s in range(p):
                got = schedule_versions("1f1b_flush", p, s, a, 3)
                assert all(vf == vb == (j - 1) // a for j, (vf, vb) in got.items())


def test_2bw_versions() -> None:
    assert [two_bw_version(j, 4) for j in range(1, 14)] == [0] * 8 + [1] * 4 + [2]
    for p in (1, 2, 3, 4, 5):
        for m in range(max(1, p - 1), 7):
            for s in range(p):
                got = schedule_versions("pipedream_2bw", p, s, m, 4)
                assert all(vf == vb for vf, vb in got.values())
                acts = build_schedule("pipedream_2bw", p, s, m, 4)
                live: set[int] = set()
                for x in acts:
                    if x.kind == "F":
                        live.add(x.index)
                    elif x.kind == "B":
                        live.discard(x.index)
                    versions = {two_bw_version(j, m) for j in live}
                    assert len(versions) <= 2, (p, m, s, x)


def test_2bw_needs_m_at_least_p_minus_1() -> None:
    # Why the precondition exists: with m < P-1 the in-flight micro-batches on stage 0 span
    # three windows, i.e. three weight versions.
    p, m = 5, 2
    acts = build_schedule("paci", p, 0, m, 4)  # same order as 2BW would use
    live: set[int] = set()
    worst = 0
    for x in acts:
        if x.kind == "F":
            live.add(x.index)
        elif x.kind == "B":
            live.discard(x.index)
        worst = max(worst, len({two_bw_version(j, m) for j in live}))
    assert worst == 3
    with pytest.raises(ValueError, match="m >= P-1"):
        schedule_versions("pipedream_2bw", p, 0, m, 4)


def test_versions_seen_rejects_broken_lists() -> None:
    with pytest.raises(ValueError, match="B1 comes before its forward"):
        versions_seen(parse("B1 F1"))
    with pytest.raises(ValueError, match="never backwarded"):
        versions_seen(parse("F1 F2 B1"))
    assert versions_seen(parse("F1 S1 B1"), start=5) == {1: (5, 6)}
