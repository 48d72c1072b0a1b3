"""Turn schedule action lists into a timeline: makespan, bubble, in-flight count, a PNG.

The simulator runs exactly the lists a schedule's spec gives the executor, with per-action
costs instead of real compute, so measured forward/backward times can be projected to
pipeline depths we cannot run (``project``). Run as a script to print a table and draw the
timeline::

    python -m megatron_paci.pipeline.simulate --schedule paci --stages 8 --microbatches 8
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_paci.pipeline.actions import Action
from megatron_paci.pipeline.registry import ScheduleSpec, get_schedule, schedule_names


@dataclass
class Costs:
    """Time of one action on a stage (any unit; backward is about twice a forward).

    With several model chunks per rank these are the costs of one chunk's action."""

    forward: float = 1.0
    backward: float = 2.0
    step: float = 0.0
    p2p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "step", "p2p"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"cost {name} must be finite and >= 0, got {v}")

    def of(self, action: Action) -> float:
        return {"F": self.forward, "B": self.backward, "STEP": self.step}[action.kind]


@dataclass
class Timeline:
    """Simulated run: ``events`` are ``(stage, action, start, end)`` in start order."""

    schedule: str
    stages: int
    window: int
    num_windows: int
    events: list[tuple[int, Action, float, float]] = field(default_factory=list)
    chunks: int = 1

    @property
    def makespan(self) -> float:
        return max((e[3] for e in self.events), default=0.0)

    @property
    def busy(self) -> list[float]:
        """Per-stage time spent in F, B and STEP."""
        out = [0.0] * self.stages
        for s, _, t0, t1 in self.events:
            out[s] += t1 - t0
        return out

    @property
    def microbatches(self) -> int:
        return self.window * self.num_windows

    def stage_events(self, stage: int) -> list[tuple[Action, float, float]]:
        return [(a, t0, t1) for s, a, t0, t1 in self.events if s == stage]


def _spec(schedule: str | ScheduleSpec) -> ScheduleSpec:
    return schedule if isinstance(schedule, ScheduleSpec) else get_schedule(schedule)


def run_lists(spec: ScheduleSpec, lists: Sequence[Sequence[Action]], chunks: int,
              per_stage_costs: Sequence[Costs]) -> list[tuple[int, Action, float, float]]:
    """Play per-rank action lists against each other, one action at a time per rank.

    F(j) on virtual stage u = chunk*P + rank waits for F(j) on u-1 plus p2p; B(j) waits
    for B(j) on u+1 plus p2p (the receiving rank's p2p cost). A global STEP(k) starts on
    every rank once all ranks have reached it (the flush, the DP all-reduce and the
    global grad-norm clip); a local one runs on its own. Raises RuntimeError naming
    where each rank waits if the lists deadlock, or if an action waits for one that
    no rank runs.
    """
    stages = len(lists)
    last = stages * chunks - 1
    done: dict[tuple[str, int, int], float] = {}  # (kind, virtual stage, j) -> end
    pos = [0] * stages
    free = [0.0] * stages
    per_stage: list[list[tuple[int, Action, float, float]]] = [[] for _ in range(stages)]

    def run(s: int, a: Action, ready: float) -> None:
        start = max(free[s], ready)
        end = start + per_stage_costs[s].of(a)
        free[s] = end
        per_stage[s].append((s, a, start, end))
        if a.spec.per_microbatch:
            done[(a.kind, a.chunk * stages + s, a.index)] = end
        pos[s] += 1

    while any(pos[s] < len(lists[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            while pos[s] < len(lists[s]):
                a = lists[s][pos[s]]
                u = a.chunk * stages + s
                ready = 0.0
                source = {"prev": u - 1 if u > 0 else None,
                          "next": u + 1 if u < last else None}.get(a.spec.receives_from)
                if source is not None:
                    key = (a.kind, source, a.index)
                    if key not in done:
                        break
                    ready = done[key] + per_stage_costs[s].p2p
                elif a.kind == "STEP" and spec.global_step:
                    break  # handled below, once every stage has reached it
                run(s, a, ready)
                progressed = True
        if spec.global_step:
            heads = [lists[s][pos[s]] if pos[s] < len(lists[s]) else None for s in range(stages)]
            if all(h is not None and h.kind == "STEP" for h in heads) and len(set(heads)) == 1:
                flush = max(free)
                for s in range(stages):
                    run(s, heads[s], flush)  # type: ignore[arg-type]
                progressed = True
        if not progressed:
            stuck = {s: str(lists[s][pos[s]]) for s in range(stages) if pos[s] < len(lists[s])}
            raise RuntimeError(f"schedule {spec.name} deadlocks; ranks waiting at {stuck}")
    events = [e for evs in per_stage for e in evs]
    events.sort(key=lambda e: e[2])  # stable: a stage's own order survives ties
    return events


def simulate(
    name: str | ScheduleSpec,
    stages: int,
    window: int,
    num_windows: int,
    costs: Costs | None = None,
    per_stage_costs: Sequence[Costs] | None = None,
    chunks: int = 1,
) -> Timeline:
    """Run the schedule's action lists (exactly what the executor runs) with costs."""
    spec = _spec(name)
    if per_stage_costs is None:
        per_stage_costs = [costs or Costs()] * stages
    elif costs is not None:
        raise ValueError("give either costs or per_stage_costs, not both")
    if len(per_stage_costs) != stages:
        raise ValueError(f"per_stage_costs has {len(per_stage_costs)} entries for {stages} stages")
    lists = [spec.actions(stages, s, window, num_windows, 1, chunks) for s in range(stages)]
    events = run_lists(spec, lists, chunks, per_stage_costs)
    return Timeline(spec.name, stages, window, num_windows, events, chunks)


def bubble_fraction(tl: Timeline) -> float:
    """Share of stage-time spent idle over the whole run: 1 - busy / (P * makespan)."""
    span = tl.makespan
    if span <= 0:
        return 0.0
    return 1.0 - sum(tl.busy) / (tl.stages * span)


def steady_state_interval(tl: Timeline) -> tuple[float, float] | None:
    """Time range that excludes the first and the last window and the warm-up/cool-down.

    Starts when every stage has finished STEP(1) and begun its first backward; ends when the
    first stage reaches the end of STEP(W-1) or of its last forward. ``None`` if empty
    (fewer than 3 windows, or a pipeline too deep for its windows to reach steady state).
    """
    w = tl.num_windows
    if w < 3:
        return None
    t0 = t1 = None
    for s in range(tl.stages):
        evs = tl.stage_events(s)
        step1 = next(e for a, _, e in evs if a.kind == "STEP" and a.index == 1)
        stepl = next(e for a, _, e in evs if a.kind == "STEP" and a.index == w - 1)
        first_b = next(b for a, b, _ in evs if a.kind == "B")
        last_f = max(e for a, _, e in evs if a.kind == "F")
        lo, hi = max(step1, first_b), min(stepl, last_f)
        t0 = lo if t0 is None else max(t0, lo)
        t1 = hi if t1 is None else min(t1, hi)
    if t0 is None or t1 is None or t1 <= t0:
        return None
    return t0, t1


def steady_state_bubble(tl: Timeline) -> float:
    """Idle share inside ``steady_state_interval``: the cost a schedule pays every window.

    1F1B-flush keeps paying its flush here; 2BW and PACI reach 0 with uniform costs.
    NaN when there is no steady state to measure.
    """
    iv = steady_state_interval(tl)
    if iv is None:
        return math.nan
    t0, t1 = iv
    busy = sum(max(0.0, min(e, t1) - max(b, t0)) for _, _, b, e in tl.events)
    return 1.0 - busy / (tl.stages * (t1 - t0))


def peak_in_flight_per_stage(tl: Timeline) -> list[int]:
    """Most micro-batches holding activations on each stage at once."""
    out = []
    for s in range(tl.stages):
        live = peak = 0
        for a, _, _ in tl.stage_events(s):
            if a.kind == "F":
                live += 1
                peak = max(peak, live)
            elif a.kind == "B":
                live -= 1
        out.append(peak)
    return out


def throughput(tl: Timeline, microbatches: int | None = None) -> float:
    """Micro-batches per time unit over the whole run (all of them by default)."""
    n = tl.microbatches if microbatches is None else microbatches
    span = tl.makespan
    return n / span if span > 0 else 0.0


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------
def _boxes(tl: Timeline) -> list:
    """The events as figure boxes; a model chunk is shown only when there are several."""
    from megatron_paci.utils.figures import Box

    several = tl.chunks > 1
    return [Box(s, t0, t1, a.kind, a.index, a.chunk if several else None)
            for s, a, t0, t1 in tl.events]


def _xlabel(tl: Timeline) -> str:
    return "time (forward = 1)" if _is_unit_forward(tl) else "time"


def draw(tl: Timeline, path: str, title: str = "", width: int | None = None) -> int:
    """Write the timeline PNG: one row per stage, F light, B dark, STEP a thin dark bar.

    Each box is labelled with its micro-batch ("F3") where it fits, so a micro-batch can be
    followed down and back up the pipe without relying on a colour cycle. ``width`` is in
    pixels (default: as wide as the labels need, within a readable aspect ratio). Returns
    the image width used.
    """
    # Imported here so the simulator itself does not import matplotlib.
    from megatron_paci.utils.figures import save_figure, timeline_figure

    fig = timeline_figure(_boxes(tl), tl.stages, title, _xlabel(tl), width_px=width)
    return save_figure(fig, path)[0]


def draw_stacked(
    timelines: Sequence[Timeline], path: str, titles: Sequence[str] | None = None
) -> int:
    """Write several timelines as stacked subplots on one time axis, to compare schedules.

    Titles default to each schedule's name, layout and bubble fraction. Returns the width.
    """
    from megatron_paci.utils.figures import TimelinePanel, save_figure, stacked_timeline_figure

    if titles is None:
        titles = [f"{tl.schedule}{f' interleaved v={tl.chunks}' if tl.chunks > 1 else ''}  "
                  f"P={tl.stages} M={tl.window} windows={tl.num_windows}  "
                  f"bubble {bubble_fraction(tl):.1%}" for tl in timelines]
    if len(titles) != len(timelines):
        raise ValueError(f"{len(titles)} titles for {len(timelines)} timelines")
    panels = [TimelinePanel(_boxes(tl), tl.stages, t)
              for tl, t in zip(timelines, titles, strict=True)]  # fmt: skip
    unit = all(_is_unit_forward(tl) for tl in timelines)
    fig = stacked_timeline_figure(panels, "time (forward = 1)" if unit else "time")
    return save_figure(fig, path)[0]


def _is_unit_forward(tl: Timeline) -> bool:
    return all(abs((e - b) - 1.0) < 1e-12 for _, a, b, e in tl.events if a.kind == "F")


# ---------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------
def summary(tl: Timeline) -> dict:
    """One table row describing a simulated run."""
    row = {
        "schedule": tl.schedule,
        "stages": tl.stages,
        "window": tl.window,
        "num_windows": tl.num_windows,
        "makespan": tl.makespan,
        "bubble": bubble_fraction(tl),
        "steady_bubble": steady_state_bubble(tl),
        "throughput": throughput(tl),
        "peak_in_flight": peak_in_flight_per_stage(tl),
    }
    spec = get_schedule(tl.schedule)
    tables = [spec.versions(tl.stages, s, tl.window, tl.num_windows, 1, tl.chunks)
              for s in range(tl.stages)]
    row["max_drift"] = [max((vb - vf for vf, vb in t.values()), default=0) for t in tables]
    row["chunks"] = tl.chunks
    return row


def project(
    name: str,
    stages_list: Sequence[int],
    window: int,
    num_windows: int,
    costs: Costs | None = None,
) -> list[dict]:
    """Rows of ``summary`` for each P: projects measured per-action costs to deeper pipes."""
    return [summary(simulate(name, p, window, num_windows, costs)) for p in stages_list]


def _fmt(v: float) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table of ``summary`` rows."""
    head = ["schedule", "P", "M", "windows", "makespan", "bubble", "steady", "thru/t",
            "peak in-flight/stage", "max drift/stage"]  # fmt: skip
    body = [
        [
            r["schedule"] + (f" v={r['chunks']}" if r.get("chunks", 1) > 1 else ""),
            str(r["stages"]),
            str(r["window"]),
            str(r["num_windows"]),
            f"{r['makespan']:g}",
            _fmt(r["bubble"]),
            _fmt(r["steady_bubble"]),
            _fmt(r["throughput"]),
            " ".join(map(str, r["peak_in_flight"])),
            " ".join(map(str, r["max_drift"])),
        ]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, *body]]  # fmt: skip
    return "\n".join(lines)


DEFAULT_OUTPUT = "simulate_out"


def _png_path(output: str | None, name: str, stages: int, window: int, several: bool,
              chunks: int = 1) -> str:
    """``output`` is a folder (default ``simulate_out/``) that gets one named PNG per
    schedule, or a path ending in .png (schedule name added for 'all')."""
    tag = f"{name}_v{chunks}" if chunks > 1 else name
    if output is None or not output.lower().endswith(".png"):
        return os.path.join(output or DEFAULT_OUTPUT, f"timeline_{tag}_P{stages}_M{window}.png")
    if not several:
        return output
    root, ext = os.path.splitext(output)
    return f"{root}_{tag}{ext}"


def _runs(schedule: str, virtual: int | None) -> list[tuple[str, int]]:
    """(schedule, chunks) pairs to simulate: 'all' is every registered schedule, plus
    the interleaved form of each that can hold several chunks per rank."""
    if schedule != "all":
        get_schedule(schedule)  # a clear error for an unknown name
        return [(schedule, virtual or 1)]
    runs = [(name, 1) for name in schedule_names()]
    runs += [(name, virtual or 2) for name in schedule_names()
             if (get_schedule(name).max_chunks or 2) > 1 and (virtual or 2) > 1]
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad arguments)."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_paci.pipeline.simulate",
        description="Simulate a pipeline schedule: bubble, in-flight count, timeline PNG.",
    )
    p.add_argument("--schedule", default="paci",
                   help=f"one of {', '.join(schedule_names())}, file:PATH, or all")
    p.add_argument("--stages", type=int, default=4, help="pipeline stages P")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per window M")
    p.add_argument("--windows", type=int, default=4, help="number of windows (global batches)")
    p.add_argument("--virtual", type=int, default=None,
                   help="model chunks per rank (interleaving; 'all' adds v=2 by default); "
                        "action costs are split evenly over the chunks")
    p.add_argument("--forward", type=float, default=1.0,
                   help="time of one forward F on a stage (default 1.0)")
    p.add_argument("--backward", type=float, default=2.0,
                   help="time of one backward B on a stage (default 2.0)")
    p.add_argument("--step", type=float, default=0.0,
                   help="time of one optimizer STEP on a stage (default 0.0)")
    p.add_argument("--p2p", type=float, default=0.0,
                   help="time for activations or gradients to reach the next stage (default 0.0)")
    p.add_argument("--output", default=None, metavar="DIR",
                   help=f"folder for the timeline PNGs (default {DEFAULT_OUTPUT}/), or a path "
                   "ending in .png (schedule name added for 'all')")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    args = p.parse_args(argv)

    rows: list[dict] = []
    notes: list[str] = []
    try:
        Costs(args.forward, args.backward, args.step, args.p2p)
        for flag, n in (("--stages", args.stages), ("--windows", args.windows)):
            if n < 1:
                raise ValueError(f"{flag} must be >= 1, got {n}")
        if args.virtual is not None and args.virtual < 1:
            raise ValueError(f"--virtual must be >= 1, got {args.virtual}")
        runs = _runs(args.schedule, args.virtual)
        names = [name for name, _ in runs]
        timelines = []
        for name, chunks in runs:
            # The same work per micro-batch at any v: each chunk holds 1/v of a stage (and
            # a chunk's own STEP updates 1/v of the rank's weights).
            step = args.step if get_schedule(name).global_step else args.step / chunks
            costs = Costs(args.forward / chunks, args.backward / chunks, step, args.p2p)
            try:
                timelines.append(simulate(name, args.stages, args.microbatches, args.windows,
                                          costs, chunks=chunks))
            except ValueError as e:
                if len(runs) == 1:
                    raise
                notes.append(f"{name}{f' v={chunks}' if chunks > 1 else ''} skipped: {e}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = [summary(tl) for tl in timelines]
    print(format_table(rows))
    for n in notes:
        print(n)
    if not args.no_plot:
        try:
            for tl, row in zip(timelines, rows, strict=True):
                path = _png_path(args.output, tl.schedule, tl.stages, tl.window, len(names) > 1,
                                 tl.chunks)
                title = (
                    f"{tl.schedule}{f' interleaved v={tl.chunks}' if tl.chunks > 1 else ''}  "
                    f"P={tl.stages} M={tl.window} windows={tl.num_windows}  "
                    f"bubble {row['bubble']:.1%}"
                )
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                draw(tl, path, title)
                print(f"wrote {path}")
            if len(timelines) > 1:
                # One figure that stacks them on a shared time axis, for comparison.
                path = _png_path(args.output, "all", args.stages, args.microbatches, True)
                draw_stacked(timelines, path)
                print(f"wrote {path}")
        except OSError as e:  # --output under a file, a read-only folder...
            print(f"error: cannot write the timeline to {e.filename or args.output}: "
                  f"{e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
