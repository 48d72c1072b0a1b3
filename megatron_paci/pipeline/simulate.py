"""Turn schedule action lists into a timeline: makespan, bubble, in-flight count, a PNG.

The simulator runs exactly the lists ``build_schedule`` gives the executor, with per-action
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

from megatron_paci.pipeline.schedules import (
    SCHEDULES,
    Action,
    build_schedule,
    paci_bound,
)


@dataclass
class Costs:
    """Time of one action on a stage (any unit; backward is about twice a forward)."""

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


def simulate(
    name: str,
    stages: int,
    window: int,
    num_windows: int,
    costs: Costs | None = None,
    per_stage_costs: Sequence[Costs] | None = None,
) -> Timeline:
    """Run every stage's action list in order, one action at a time.

    F(j) on stage s>0 waits for F(j) on s-1 plus p2p; B(j) on s<P-1 waits for B(j) on s+1
    plus p2p (the p2p cost of the receiving stage). A 1F1B-flush STEP is global: STEP(k)
    starts on every stage once all stages have reached it (the flush, the DP all-reduce and
    the global grad-norm clip). 2BW and PACI step locally.
    """
    if per_stage_costs is None:
        per_stage_costs = [costs or Costs()] * stages
    elif costs is not None:
        raise ValueError("give either costs or per_stage_costs, not both")
    if len(per_stage_costs) != stages:
        raise ValueError(f"per_stage_costs has {len(per_stage_costs)} entries for {stages} stages")
    lists = [build_schedule(name, stages, s, window, num_windows) for s in range(stages)]
    global_step = name == "1f1b_flush"
    f_end: list[dict[int, float]] = [{} for _ in range(stages)]
    b_end: list[dict[int, float]] = [{} for _ in range(stages)]
    pos = [0] * stages
    free = [0.0] * stages
    per_stage: list[list[tuple[int, Action, float, float]]] = [[] for _ in range(stages)]

    def run(s: int, a: Action, ready: float) -> None:
        start = max(free[s], ready)
        end = start + per_stage_costs[s].of(a)
        free[s] = end
        per_stage[s].append((s, a, start, end))
        if a.kind == "F":
            f_end[s][a.index] = end
        elif a.kind == "B":
            b_end[s][a.index] = end
        pos[s] += 1

    while any(pos[s] < len(lists[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            while pos[s] < len(lists[s]):
                a = lists[s][pos[s]]
                ready = 0.0
                if a.kind == "F" and s > 0:
                    if a.index not in f_end[s - 1]:
                        break
                    ready = f_end[s - 1][a.index] + per_stage_costs[s].p2p
                elif a.kind == "B" and s < stages - 1:
                    if a.index not in b_end[s + 1]:
                        break
                    ready = b_end[s + 1][a.index] + per_stage_costs[s].p2p
                elif a.kind == "STEP" and global_step:
                    break  # handled below, once every stage has reached it
                run(s, a, ready)
                progressed = True
        if global_step:
            heads = [lists[s][pos[s]] if pos[s] < len(lists[s]) else None for s in range(stages)]
            if all(h is not None and h.kind == "STEP" for h in heads) and len(set(heads)) == 1:
                flush = max(free)
                for s in range(stages):
                    run(s, heads[s], flush)  # type: ignore[arg-type]
                progressed = True
        if not progressed:
            stuck = {s: str(lists[s][pos[s]]) for s in range(stages) if pos[s] < len(lists[s])}
            raise RuntimeError(f"schedule {name} deadlocks; stages waiting at {stuck}")

    events = [e for evs in per_stage for e in evs]
    events.sort(key=lambda e: e[2])  # stable: a stage's own order survives ties
    return Timeline(name, stages, window, num_windows, events)


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
_STEP_INK = (25, 25, 25)


def _darker(c: Sequence[int], f: float = 0.55) -> tuple[int, int, int]:
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


def _lighter(c: Sequence[int], f: float = 0.35) -> tuple[int, int, int]:
    return tuple(int(v + (255 - v) * f) for v in c)  # type: ignore[return-value]


def auto_width(tl: Timeline) -> int:
    """Image width that gives the shortest F box room for a label such as "F12" (capped)."""
    shortest = min((e - b for _, a, b, e in tl.events if a.kind == "F" and e > b), default=0)
    if shortest <= 0 or tl.makespan <= 0:
        return 1200
    px = 38 * tl.makespan / shortest + 140
    return int(min(max(px, 1200), 4000))


def draw(tl: Timeline, path: str, title: str = "", width: int | None = None) -> int:
    """Write the timeline PNG: one row per stage, F/B boxes coloured by micro-batch.

    F(j) and B(j) share micro-batch j's colour (F lighter, B darker, and labelled), so a
    micro-batch can be followed down and back up the pipe; STEPs are labelled markers.
    Returns the image width used.
    """
    # Imported here so the simulator itself needs nothing beyond the standard library.
    from megatron_paci.utils.canvas import PALETTE as pal
    from megatron_paci.utils.plots import timeline_plot

    boxes = []
    markers = []
    for s, a, t0, t1 in tl.events:
        if a.kind == "STEP":
            markers.append((s, t0, str(a)))
            continue
        base = pal[(a.index - 1) % len(pal)]
        color = _lighter(base) if a.kind == "F" else _darker(base)
        boxes.append((s, t0, t1, color, str(a)))
    w = auto_width(tl) if width is None else width
    legend = [
        ("F forward (light)", _lighter(pal[0])),
        ("B backward (dark)", _darker(pal[0])),
        ("S step", _STEP_INK),
    ]
    timeline_plot(
        path,
        [f"stage {s}" for s in range(tl.stages)],
        boxes,
        markers,
        title=title,
        xlabel=("time (forward = 1)" if _is_unit_forward(tl) else "time")
        + ";  colour = micro-batch j, the same for F(j) and B(j)",
        width=w,
        legend=legend,
    )
    return w


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
    if tl.schedule == "paci":
        row["bound"] = [paci_bound(tl.stages, s, tl.window) for s in range(tl.stages)]
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
            "peak in-flight/stage", "paci bound/stage"]  # fmt: skip
    body = [
        [
            r["schedule"],
            str(r["stages"]),
            str(r["window"]),
            str(r["num_windows"]),
            f"{r['makespan']:g}",
            _fmt(r["bubble"]),
            _fmt(r["steady_bubble"]),
            _fmt(r["throughput"]),
            " ".join(map(str, r["peak_in_flight"])),
            " ".join(map(str, r["bound"])) if "bound" in r else "-",
        ]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, *body]]  # fmt: skip
    return "\n".join(lines)


DEFAULT_OUTPUT = "simulate_out"


def _png_path(output: str | None, name: str, stages: int, window: int, several: bool) -> str:
    """``output`` is a folder (default ``simulate_out/``) that gets one named PNG per
    schedule, or a path ending in .png (schedule name added for 'all')."""
    if output is None or not output.lower().endswith(".png"):
        return os.path.join(output or DEFAULT_OUTPUT, f"timeline_{name}_P{stages}_M{window}.png")
    if not several:
        return output
    root, ext = os.path.splitext(output)
    return f"{root}_{name}{ext}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad arguments)."""
    p = argparse.ArgumentParser(
        prog="python -m megatron_paci.pipeline.simulate",
        description="Simulate a pipeline schedule: bubble, in-flight count, timeline PNG.",
    )
    p.add_argument("--schedule", default="paci", help=f"one of {', '.join(SCHEDULES)} or all")
    p.add_argument("--stages", type=int, default=4, help="pipeline stages P")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per window M")
    p.add_argument("--windows", type=int, default=4, help="number of windows (global batches)")
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

    names = list(SCHEDULES) if args.schedule == "all" else [args.schedule]
    rows: list[dict] = []
    notes: list[str] = []
    try:
        costs = Costs(args.forward, args.backward, args.step, args.p2p)
        if args.schedule != "all" and args.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {args.schedule!r}; valid: {', '.join(SCHEDULES)}, all"
            )
        if args.windows < 1:
            raise ValueError(f"--windows must be >= 1, got {args.windows}")
        timelines = []
        for name in names:
            try:
                timelines.append(simulate(name, args.stages, args.microbatches, args.windows,
                                          costs))  # fmt: skip
            except ValueError as e:
                if len(names) == 1 or "2BW" not in str(e):
                    raise
                notes.append(f"{name} skipped: {e}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = [summary(tl) for tl in timelines]
    print(format_table(rows))
    for n in notes:
        print(n)
    if not args.no_plot:
        for tl, row in zip(timelines, rows, strict=True):
            path = _png_path(args.output, tl.schedule, tl.stages, tl.window, len(names) > 1)
            title = (
                f"{tl.schedule}  P={tl.stages} M={tl.window} windows={tl.num_windows}  "
                f"bubble {row['bubble']:.1%}"
            )
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            draw(tl, path, title)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
