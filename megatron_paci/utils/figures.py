"""Figures for training runs and pipeline schedules, drawn with matplotlib (Agg).

matplotlib is imported inside the functions that draw, so importing this module (or the
simulator, which imports it lazily too) costs nothing. Figures are built on
``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so no global
backend is switched and no figure outlives its function.

Timelines take plain data: one ``Box`` per action, rows are pipeline stages. A box's kind
is "F", "B" or "STEP" today; other kinds (a zero-bubble "W", say) draw with a mid shade
and a hatch, and an optional ``chunk`` (the model chunk of an interleaved schedule) picks
the colour family and is written into the label ("F3c1").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
FILE_MODE = 0o644

# Inches. A row per stage is tall enough for a label inside its box; the margins hold the
# stage names, the title, the legend and the time axis.
ROW_IN = 0.45
LEFT_IN, RIGHT_IN = 0.85, 0.25
TITLE_IN, LEGEND_ROW_IN, AXIS_IN = 0.35, 0.25, 0.6
LEGEND_PT = 9.0
MIN_ASPECT, MAX_ASPECT = 2.0, 5.0
MIN_WIDTH_IN, MAX_WIDTH_IN = 6.0, 24.0
LABEL_PT, SMALL_LABEL_PT = 8.0, 6.5  # the smaller one where a capped width leaves less room

# (light, mid, dark) per model chunk: F light, other kinds mid, B dark. Chunk None is 0.
_CHUNK_SHADES = [
    ("#a6cee3", "#5b9bd5", "#1f4e79"),  # blue
    ("#fdbf6f", "#f28e2b", "#a0451a"),  # orange
    ("#b2df8a", "#59a14f", "#2b6a2b"),  # green
    ("#cab2d6", "#9467bd", "#4b2a6e"),  # purple
]
_STEP_INK = "#111111"
_KIND_NAMES = {"F": "forward", "B": "backward", "STEP": "optimizer step"}


@dataclass(frozen=True)
class Box:
    """One action on one timeline row: ``[start, end)`` in any time unit.

    ``index`` is the micro-batch for F/B and the update number for STEP; ``chunk`` the model
    chunk for schedules that run several on one rank (None: one chunk per rank).
    """

    row: int
    start: float
    end: float
    kind: str
    index: int | None = None
    chunk: int | None = None

    @property
    def label(self) -> str:
        head = "S" if self.kind == "STEP" else self.kind
        num = "" if self.index is None else str(self.index)
        tail = "" if self.chunk is None else f"c{self.chunk}"
        return f"{head}{num}{tail}"


@dataclass(frozen=True)
class TimelinePanel:
    """One schedule's timeline: its boxes, how many rows, and a title."""

    boxes: Sequence[Box]
    rows: int
    title: str = ""
    row_names: Sequence[str] | None = None


def _style(kind: str, chunk: int | None) -> tuple[str, str, str]:
    """(face colour, hatch, text colour) of a box; F light, B dark, others mid + hatch."""
    c = 0 if chunk is None else chunk
    light, mid, dark = _CHUNK_SHADES[c % len(_CHUNK_SHADES)]
    # Past the palette, chunks repeat a colour family but gain a hatch so they stay apart.
    hatch = "" if c < len(_CHUNK_SHADES) else "//"
    if kind == "F":
        return light, hatch, "black"
    if kind == "B":
        return dark, hatch, "white"
    return mid, hatch or "xx", "black"


def _validate(panel: TimelinePanel, where: str) -> None:
    if panel.rows < 1:
        raise ValueError(f"{where}: a timeline needs at least one row, got {panel.rows}")
    if panel.row_names is not None and len(panel.row_names) != panel.rows:
        raise ValueError(f"{where}: {len(panel.row_names)} row names for {panel.rows} rows")
    for b in panel.boxes:
        if not 0 <= b.row < panel.rows:
            raise ValueError(f"{where}: box {b.label} row {b.row} outside 0..{panel.rows - 1}")
        if not (math.isfinite(b.start) and math.isfinite(b.end)) or b.end < b.start:
            raise ValueError(f"{where}: box {b.label} has a bad interval [{b.start}, {b.end}]")


def _time_range(panels: Sequence[TimelinePanel]) -> tuple[float, float]:
    starts = [b.start for p in panels for b in p.boxes]
    ends = [b.end for p in panels for b in p.boxes]
    lo, hi = (min(starts), max(ends)) if starts else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.01 * (hi - lo)
    return lo - pad, hi + pad


def _label_width_in(text: str, size: float = LABEL_PT) -> float:
    """Width a box needs for ``text`` (DejaVu Sans is about 0.62 em per glyph) plus margins."""
    return (len(text) * 0.62 * size + 0.4 * size) / 72.0


def _legend_in(rows: int) -> float:
    return 0.15 + LEGEND_ROW_IN * rows


def _legend_entry_in(label: str) -> float:
    """Width of one legend entry: swatch, gap and text (about 0.6 em per glyph)."""
    return (len(label) * 0.6 * LEGEND_PT + 40.0) / 72.0


def _figure_width_px(panels: Sequence[TimelinePanel], height_in: float, span: float) -> int:
    """Wide enough that the shortest F/B box holds its label, within the aspect bounds."""
    need = MIN_WIDTH_IN
    for p in panels:
        for b in p.boxes:
            if b.kind != "STEP" and b.end > b.start:
                axes_in = _label_width_in(b.label) * span / (b.end - b.start)
                need = max(need, axes_in + LEFT_IN + RIGHT_IN)
    lo = max(MIN_WIDTH_IN, MIN_ASPECT * height_in)
    hi = max(lo, min(MAX_WIDTH_IN, MAX_ASPECT * height_in))
    # Rounded up with a little slack so the box that set the width still passes the fit test.
    return math.ceil(min(max(need * 1.01, lo), hi) * DPI)


def _draw_panel(ax, panel: TimelinePanel, t_range: tuple[float, float], axes_w_in: float) -> None:
    from matplotlib.patches import Rectangle

    ax.set_xlim(*t_range)
    ax.set_ylim(panel.rows - 0.5, -0.5)  # stage 0 on top
    names = panel.row_names or [f"stage {s}" for s in range(panel.rows)]
    ax.set_yticks(range(panel.rows), labels=list(names))
    ax.tick_params(axis="y", length=0)
    for r in range(1, panel.rows):
        ax.axhline(r - 0.5, color="#dddddd", linewidth=0.8, zorder=0)
    ax.grid(axis="x", color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    if panel.title:
        ax.set_title(panel.title, fontsize=11, loc="left")
    in_per_unit = axes_w_in / (t_range[1] - t_range[0])
    for b in panel.boxes:
        if b.kind == "STEP":
            # A thin full-height dark bar: visible even for a zero-cost step.
            ax.add_patch(Rectangle((b.start, b.row - 0.42), b.end - b.start, 0.84,
                                   facecolor=_STEP_INK, edgecolor=_STEP_INK, linewidth=2.0,
                                   gid=b.label, zorder=3))  # fmt: skip
            continue
        face, hatch, ink = _style(b.kind, b.chunk)
        width_in = (b.end - b.start) * in_per_unit
        # An outline on a box a few pixels wide would paint it the edge colour.
        edge = 0.6 if width_in * DPI >= 5 else 0.0
        ax.add_patch(Rectangle((b.start, b.row - 0.3), b.end - b.start, 0.6, facecolor=face,
                               edgecolor="#333333", linewidth=edge, hatch=hatch or None,
                               gid=b.label, zorder=2))  # fmt: skip
        size = next((pt for pt in (LABEL_PT, SMALL_LABEL_PT)
                     if width_in >= _label_width_in(b.label, pt)), None)  # fmt: skip
        if size is not None:
            ax.text((b.start + b.end) / 2, b.row, b.label, ha="center", va="center",
                    fontsize=size, color=ink, clip_on=True, zorder=4)  # fmt: skip


def _legend_handles(panels: Sequence[TimelinePanel]) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    seen: dict[tuple[str, int | None], None] = {}
    for p in panels:
        for b in p.boxes:
            seen.setdefault((b.kind, b.chunk), None)
    order = {"F": 0, "B": 1, "STEP": 3}
    handles = []
    for kind, chunk in sorted(seen, key=lambda k: (k[1] or 0, order.get(k[0], 2), k[0])):
        if kind == "STEP":
            handles.append(Line2D([], [], color=_STEP_INK, linewidth=3, label="S step"))
            continue
        name = f"{kind} {_KIND_NAMES.get(kind, 'action')}"
        if chunk is not None:
            name += f", chunk {chunk}"
        face, hatch, _ = _style(kind, chunk)
        handles.append(Patch(facecolor=face, edgecolor="#333333", hatch=hatch or None,
                             label=name))  # fmt: skip
    # One STEP entry, last, however many chunks stepped.
    steps = [h for h in handles if h.get_label() == "S step"]
    return [h for h in handles if h.get_label() != "S step"] + steps[:1]


def stacked_timeline_figure(
    panels: Sequence[TimelinePanel], xlabel: str = "time", width_px: int | None = None
) -> Figure:
    """Several schedules' timelines, one subplot each, on one shared time axis.

    Sized so that a row per stage stays readable and the figure stays between about 2:1
    and 5:1; a box's label ("F3") is written only where it fits.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("stacked_timeline_figure needs at least one panel")
    for i, p in enumerate(panels):
        _validate(p, p.title or f"panel {i}")
    t_range = _time_range(panels)
    heights = [p.rows * ROW_IN + (TITLE_IN if p.title else 0.15) for p in panels]
    handles = _legend_handles(panels)
    body_in = sum(heights) + AXIS_IN
    w_px = width_px if width_px is not None else _figure_width_px(
        panels, body_in + _legend_in(1), t_range[1] - t_range[0])  # fmt: skip
    if w_px < DPI * (LEFT_IN + RIGHT_IN + 1.0):
        raise ValueError(f"width {w_px} px is too small for a timeline")
    w_in = w_px / DPI
    axes_w_in = w_in - LEFT_IN - RIGHT_IN
    # As many legend entries a row as fit over the axes; more rows where they do not.
    entry_in = max(_legend_entry_in(h.get_label()) for h in handles) if handles else 1.0
    ncols = max(1, min(len(handles), int(axes_w_in // entry_in)))
    legend_in = _legend_in(math.ceil(len(handles) / ncols) if handles else 1)
    h_px = round((legend_in + body_in) * DPI)
    height_in = h_px / DPI
    fig = Figure(figsize=(w_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    top = height_in - legend_in
    first = None
    for p, h in zip(panels, heights, strict=True):
        top -= h - p.rows * ROW_IN
        bottom = top - p.rows * ROW_IN
        ax = fig.add_axes((LEFT_IN / w_in, bottom / height_in, axes_w_in / w_in,
                           p.rows * ROW_IN / height_in))  # fmt: skip
        if first is None:
            first = ax
        else:
            ax.sharex(first)
        _draw_panel(ax, p, t_range, axes_w_in)
        top = bottom
    for ax in fig.axes[:-1]:
        ax.tick_params(axis="x", labelbottom=False)
    fig.axes[-1].set_xlabel(xlabel)
    fig.legend(handles=handles, loc="upper right", ncols=ncols, fontsize=LEGEND_PT,
               frameon=False, bbox_to_anchor=(1 - RIGHT_IN / w_in, 1.0))  # fmt: skip
    return fig


def timeline_figure(
    boxes: Sequence[Box],
    rows: int,
    title: str = "",
    xlabel: str = "time",
    width_px: int | None = None,
    row_names: Sequence[str] | None = None,
) -> Figure:
    """One schedule's timeline: a row per stage, F light, B dark, STEP a thin dark bar."""
    return stacked_timeline_figure([TimelinePanel(boxes, rows, title, row_names)], xlabel,
                                   width_px)  # fmt: skip


def loss_figure(
    train: tuple[Sequence[float], Sequence[float]],
    validation: tuple[Sequence[float], Sequence[float]] | None = None,
    title: str = "language-model loss",
) -> Figure:
    """Training loss per iteration as a line, validation loss as marked points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for name, series in (("train", train), ("validation", validation)):
        if series is not None and len(series[0]) != len(series[1]):
            raise ValueError(f"{name} loss: {len(series[0])} iterations for "
                             f"{len(series[1])} values")  # fmt: skip
    fig = Figure(figsize=(8, 5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(list(train[0]), [_finite(v) for v in train[1]], color="#1f77b4", linewidth=1.5,
            label="train loss")  # fmt: skip
    if validation is not None and len(validation[0]):
        ax.plot(list(validation[0]), [_finite(v) for v in validation[1]], color="#d62728",
                marker="o", linewidth=1.0, label="validation loss")  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(color="#e6e6e6")
    ax.legend()
    return fig


@dataclass(frozen=True)
class SeedRuns:
    """One schedule's runs over several seeds, on a shared x grid (tokens or seconds):
    ``y[seed][i]`` is the loss at ``x[i]``."""

    label: str
    x: Sequence[float]
    y: Sequence[Sequence[float]]


def seed_band_figure(panels: Sequence[tuple[str, Sequence[SeedRuns]]],
                     ylabel: str = "validation loss", title: str = "") -> Figure:
    """Side-by-side panels (e.g. loss against tokens, and against wall-clock time), one
    colour per schedule: the mean over seeds as a line, min..max over seeds as a band.
    What the schedule comparison draws: a difference smaller than the band is noise."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("seed_band_figure needs at least one panel")
    fig = Figure(figsize=(6 * len(panels), 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    for ax, (xlabel, runs) in zip(axes, panels, strict=True):
        for k, r in enumerate(runs):
            if not r.y or any(len(row) != len(r.x) for row in r.y):
                raise ValueError(f"{r.label}: every seed needs one value per x "
                                 f"({len(r.x)} x values)")
            cols = list(zip(*r.y, strict=True))
            mean = [sum(c) / len(c) for c in cols]
            colour = colours[k % len(colours)]
            ax.plot(list(r.x), mean, color=colour, linewidth=1.6,
                    label=f"{r.label} (mean of {len(r.y)} seeds)")
            ax.fill_between(list(r.x), [min(c) for c in cols], [max(c) for c in cols],
                            color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(color="#e6e6e6")
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def _finite(v: float) -> float:
    """NaN for inf: matplotlib breaks a line at NaN but would stretch the axis to inf."""
    v = float(v)
    return v if math.isfinite(v) else math.nan


def save_figure(fig: Figure, path: str) -> tuple[int, int]:
    """Write ``fig`` as a PNG readable by everyone (0644) and return its (width, height) px."""
    fig.savefig(path, dpi=DPI, format="png")
    os.chmod(path, FILE_MODE)  # savefig honours the umask; runs are shared, so widen it
    w, h = fig.canvas.get_width_height()
    return w, h
