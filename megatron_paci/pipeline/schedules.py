"""The built-in schedules, each declared once, and helpers over their action lists.

A schedule is a pure function of (P stages, stage s, window size, number of windows,
chunks per rank), so the executor, the simulator and the unit tests all read the same
lists and cannot disagree. 1F1B-flush (with or without interleaving), PipeDream-2BW
and PACI differ in where ``STEP`` sits and in their weight-version policy.

Notation follows ``design.md``: micro-batch ``j`` is 1-based, in the order stage 0 forwards
them; update ``k`` is 1-based; a version ``v`` is the number of updates already applied.
"""

from __future__ import annotations

import functools
import math

from megatron_paci.pipeline.actions import STEP, Action, B, F  # noqa: F401  (re-exported)
from megatron_paci.pipeline.orders import (
    check_stage,
    interleaved_one_f_one_b,
    interleaving_problem,
    one_f_one_b,
)
from megatron_paci.pipeline.registry import ScheduleSpec, get_schedule, register, schedule_names
from megatron_paci.pipeline.versions import TWO_VERSIONS, live_table, two_bw_version


def flushed_windows(order, stages: int, stage: int, window: int, num_windows: int,
                    first_window: int, chunks: int) -> list[Action]:
    """``order`` run once per window, each followed by the window's STEP (the flush)."""
    actions: list[Action] = []
    for w in range(num_windows):
        k = first_window + w
        actions += order(stages, stage, chunks, window, (k - 1) * window + 1)
        actions.append(STEP(k))
    return actions


def local_steps(actions: list[Action], window: int) -> list[Action]:
    """A STEP of each chunk right after that chunk's last backward of each window on
    this rank (no flush). A chunk's backwards run in micro-batch order, so STEP(k, c)
    follows B(k*window, c) and accumulates exactly window k of chunk c."""
    out = []
    for a in actions:
        out.append(a)
        if a.kind == "B" and a.index % window == 0:
            out.append(STEP(a.index // window, a.chunk))
    return out


def _flush(stages, stage, window, num_windows, first_window, chunks):
    return flushed_windows(interleaved_one_f_one_b, stages, stage, window, num_windows,
                           first_window, chunks)


def _no_flush(stages, stage, window, num_windows, first_window, chunks):
    """One 1F1B order (interleaved for several chunks) over every window of the segment:
    without a flush nothing separates windows but where each chunk steps."""
    first_j = (first_window - 1) * window + 1
    order = interleaved_one_f_one_b(stages, stage, chunks, window * num_windows, first_j)
    return local_steps(order, window)


def _interleaving_requires(stages: int, window: int, chunks: int) -> str | None:
    return interleaving_problem(stages, chunks, window)


@functools.cache
def updates_crossed(stages: int, window: int, chunks: int) -> int:
    """The most updates of its own chunk a micro-batch crosses between F and B under the
    no-flush order with each chunk stepping after its own window, counted from the lists
    over enough windows to pass every warm-up (PACI's drift; ceil((P-1)/a) unchunked).
    Cached: 2BW's precondition asks it each time its action lists are built."""
    windows = max(4, -(-8 * stages // window))
    most = 0
    for s in range(stages):
        acts = _no_flush(stages, s, window, windows, 1, chunks)
        table = live_table(acts, window, 0, per_chunk=True)
        most = max(most, max(vb - vf for vf, vb in table.values()))
    return most


def _two_bw_requires(stages: int, window: int, chunks: int) -> str | None:
    if chunks == 1:
        if window < stages - 1:
            return (f"PipeDream-2BW needs m >= P-1: the window m = train.global_batch_size / "
                    f"(train.micro_batch_size x dp) = {window} < parallel.pipeline-1 = "
                    f"{stages - 1} (otherwise more than two weight versions are in flight)")
        return None
    problem = interleaving_problem(stages, chunks, window)
    if problem:
        return problem
    # Two versions per chunk suffice while no micro-batch crosses more than one update of
    # its chunk (docs/schedules/virtual_stages.md).
    crossed = updates_crossed(stages, window, chunks)
    if crossed > 1:
        fits = next(m for m in range(window + stages, 4 * stages * stages + 1, stages)
                    if updates_crossed(stages, m, chunks) <= 1)
        return (f"PipeDream-2BW with parallel.virtual_pipeline={chunks} keeps two weight "
                f"versions per chunk only while a micro-batch crosses at most one update of "
                f"its chunk; the window m = train.global_batch_size / (train.micro_batch_size"
                f" x dp) = {window} lets it cross {crossed} at parallel.pipeline={stages}: "
                f"use m >= {fits} (docs/schedules/virtual_stages.md)")
    return None


FLUSH = register(ScheduleSpec(
    name="1f1b_flush", title="1F1B-flush", build=_flush, global_step=True,
    tied_embeddings_across_stages=True, max_chunks=None, requires=_interleaving_requires,
    summary="Megatron's default: 1F1B per window, then a global flush and step; with "
            "parallel.virtual_pipeline=v, Megatron's interleaved 1F1B"))
PIPEDREAM_2BW = register(ScheduleSpec(
    name="pipedream_2bw", title="PipeDream-2BW", build=_no_flush, global_step=False,
    tied_embeddings_across_stages=False, weights=TWO_VERSIONS, requires=_two_bw_requires,
    max_chunks=None,
    summary="no flush, two weight versions, one-step delayed gradients"))
PACI = register(ScheduleSpec(
    name="paci", title="PACI", build=_no_flush, global_step=False,
    tied_embeddings_across_stages=False, max_chunks=None, requires=_interleaving_requires,
    summary="no flush, one weight copy; each stage (each model chunk, interleaved) "
            "steps after its own window"))

SCHEDULES = schedule_names()


# --- helpers over action lists (single chunk unless said) ----------------------------

def build_schedule(name: str, stages: int, stage: int, window: int, num_windows: int,
                   first_window: int = 1, chunks: int = 1) -> list[Action]:
    """The action list of ``stage`` under the registered schedule ``name``."""
    check_stage(stages, stage)
    return get_schedule(name).actions(stages, stage, window, num_windows, first_window, chunks)


def versions_seen(actions: list[Action], start: int | None = None) -> dict[int, tuple[int, int]]:
    """``j -> (v_F, v_B)`` on a single-chunk list: the live-weight versions.

    ``start`` is the version at the top of the list; by default it is inferred from the
    first STEP's number (STEP(k) first means k-1 updates happened earlier), else 0."""
    if start is None:
        start = next((a.index - 1 for a in actions if a.kind == "STEP"), 0)
    return {j: v for (_, j), v in live_table(actions, 1, start).items()}


def schedule_versions(name: str, stages: int, stage: int, window: int, num_windows: int,
                      first_window: int = 1) -> dict[int, tuple[int, int]]:
    """``j -> (v_F, v_B)`` for a single-chunk schedule under its weight-version policy."""
    table = get_schedule(name).versions(stages, stage, window, num_windows, first_window)
    return {j: v for (_, j), v in table.items()}


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batch chunks forwarded but not yet backwarded at any point."""
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
    check_stage(stages, stage)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return math.ceil((stages - stage - 1) / window)


__all__ = ["FLUSH", "PACI", "PIPEDREAM_2BW", "SCHEDULES", "Action", "B", "F", "STEP",
           "build_schedule", "local_steps", "one_f_one_b", "paci_bound", "peak_in_flight",
           "schedule_versions", "two_bw_version", "versions_seen"]
