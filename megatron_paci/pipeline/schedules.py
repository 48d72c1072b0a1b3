"""Pipeline schedules as data: per-stage lists of ``F(j)``, ``B(j)`` and ``STEP(k)`` actions.

A schedule is a pure function of (P stages, stage s, window size, number of windows), so the
executor, the simulator and the unit tests all read the same lists and cannot disagree.
The three schedules differ only in where ``STEP`` sits and in the weight-version policy the
executor applies (``schedule_versions`` states that policy as numbers).

Notation follows ``design.md``: micro-batch ``j`` is 1-based, in the order stage 0 forwards
them; update ``k`` is 1-based; a version ``v`` is the number of updates already applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("1f1b_flush", "pipedream_2bw", "paci")

_KINDS = ("F", "B", "STEP")


@dataclass(frozen=True)
class Action:
    """One step of a stage's schedule.

    ``kind`` is "F", "B" or "STEP"; ``index`` is the micro-batch j for F/B and the update
    number k for STEP (both 1-based).
    """

    kind: str
    index: int

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {_KINDS}")
        if self.index < 1:
            raise ValueError(f"action index must be >= 1, got {self.index}")

    def __str__(self) -> str:
        return f"{'S' if self.kind == 'STEP' else self.kind}{self.index}"


def F(j: int) -> Action:
    """Forward of micro-batch ``j``."""
    return Action("F", j)


def B(j: int) -> Action:
    """Backward of micro-batch ``j``."""
    return Action("B", j)


def STEP(k: int) -> Action:
    """The ``k``-th optimizer update."""
    return Action("STEP", k)


def _check_stage(stages: int, stage: int) -> None:
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} out of range for {stages} stages (0..{stages - 1})")


def one_f_one_b(stages: int, stage: int, num_microbatches: int, first: int = 1) -> list[Action]:
    """1F1B order for micro-batches ``first .. first+N-1`` on one stage.

    Warm-up of ``min(P-s-1, N)`` forwards fills the pipe below this stage, then (F, B) pairs
    keep at most ``P-s`` micro-batches in flight, then the cool-down drains the backwards.
    """
    _check_stage(stages, stage)
    if num_microbatches < 0:
        raise ValueError(f"num_microbatches must be >= 0, got {num_microbatches}")
    if first < 1:
        raise ValueError(f"first micro-batch must be >= 1, got {first}")
    n = num_microbatches
    warm = min(stages - stage - 1, n)
    actions = [F(first + i) for i in range(warm)]
    for i in range(n - warm):
        actions += [F(first + warm + i), B(first + i)]
    actions += [B(first + i) for i in range(n - warm, n)]
    return actions


def _check_schedule(name: str, stages: int, stage: int, window: int, num_windows: int) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    _check_stage(stages, stage)
    if window < 1:
        raise ValueError(
            f"window must be >= 1 micro-batch, got {window}: a window of zero never steps"
        )
    if num_windows < 0:
        raise ValueError(f"num_windows must be >= 0, got {num_windows}")
    if name == "pipedream_2bw" and window < stages - 1:
        raise ValueError(
            f"PipeDream-2BW needs m >= P-1: window={window} < stages-1={stages - 1} "
            "(otherwise more than two weight versions are in flight)"
        )


def build_schedule(
    name: str, stages: int, stage: int, window: int, num_windows: int, first_window: int = 1
) -> list[Action]:
    """The action list of ``stage`` for ``num_windows`` windows of ``window`` micro-batches.

    ``1f1b_flush`` runs a full 1F1B per window and steps after its cool-down (the flush).
    ``pipedream_2bw`` and ``paci`` run one 1F1B over all windows and step locally right after
    each window's last backward on this stage, so the pipe never drains between windows.
    ``first_window > 1`` continues the numbering of micro-batches and steps after an earlier
    segment (a drain for evaluation or a checkpoint); each segment starts with a warm-up.
    """
    _check_schedule(name, stages, stage, window, num_windows)
    if first_window < 1:
        raise ValueError(f"first_window must be >= 1, got {first_window}")
    k0 = first_window - 1  # updates before this segment
    first_j = k0 * window + 1
    if name == "1f1b_flush":
        actions: list[Action] = []
        for w in range(num_windows):
            actions += one_f_one_b(stages, stage, window, first_j + w * window)
            actions.append(STEP(k0 + w + 1))
        return actions
    actions = []
    for a in one_f_one_b(stages, stage, window * num_windows, first_j):
        actions.append(a)
        if a.kind == "B" and a.index % window == 0:
            actions.append(STEP(a.index // window))
    return actions


def versions_seen(actions: list[Action], start: int | None = None) -> dict[int, tuple[int, int]]:
    """``j -> (v_F, v_B)``: updates applied on this stage before F(j) and before B(j).

    These are the live-weight versions, which PACI and 1F1B-flush use. ``start`` is the
    version at the top of the list; by default it is inferred from the first STEP's number
    (STEP(k) first means k-1 updates happened in earlier segments), else 0.
    """
    if start is None:
        start = next((a.index - 1 for a in actions if a.kind == "STEP"), 0)
    v = start
    v_f: dict[int, int] = {}
    out: dict[int, tuple[int, int]] = {}
    for a in actions:
        if a.kind == "STEP":
            v += 1
        elif a.kind == "F":
            v_f[a.index] = v
        else:
            if a.index not in v_f:
                raise ValueError(f"B{a.index} comes before F{a.index}")
            out[a.index] = (v_f[a.index], v)
    missing = sorted(set(v_f) - set(out))
    if missing:
        raise ValueError(f"micro-batches forwarded but never backwarded: {missing}")
    return dict(sorted(out.items()))


def two_bw_version(j: int, window: int) -> int:
    """The stashed version PipeDream-2BW's F(j) and B(j) both use: one-step delayed weights."""
    if j < 1 or window < 1:
        raise ValueError(f"need j >= 1 and window >= 1, got j={j}, window={window}")
    return max(0, (j - 1) // window - 1)


def schedule_versions(
    name: str, stages: int, stage: int, window: int, num_windows: int, first_window: int = 1
) -> dict[int, tuple[int, int]]:
    """``j -> (v_F, v_B)`` under the schedule's weight-version policy.

    Flush and PACI use the live weights (``versions_seen``); 2BW runs F(j) and B(j) on the
    same stashed copy, so both are ``two_bw_version(j)``.
    """
    actions = build_schedule(name, stages, stage, window, num_windows, first_window)
    if name == "pipedream_2bw":
        js = sorted(a.index for a in actions if a.kind == "F")
        return {j: (two_bw_version(j, window),) * 2 for j in js}
    return versions_seen(actions, start=first_window - 1)


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batches forwarded but not yet backwarded at any point: activation memory."""
    live = peak = 0
    for a in actions:
        if a.kind == "F":
            live += 1
            peak = max(peak, live)
        elif a.kind == "B":
            live -= 1
    return peak


def paci_bound(stages: int, stage: int, window: int) -> int:
    """Most updates PACI can apply on ``stage`` between F(j) and B(j): ceil((P-s-1)/a)."""
    _check_stage(stages, stage)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return math.ceil((stages - stage - 1) / window)
