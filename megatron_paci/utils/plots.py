"""PNG plots for training runs (loss curves) and pipeline schedules (timelines).

Built on ``canvas.Canvas`` so the framework needs no plotting library. Both plot functions
return the pixel mapping they used, which lets tests and callers locate data in the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_paci.utils.canvas import PALETTE, Canvas, Color

_AXIS = (60, 60, 60)
_GRID = (228, 228, 228)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)


# ---------------------------------------------------------------------------------------
# Ticks
# ---------------------------------------------------------------------------------------
def nice_step(span: float, target: int) -> float:
    """Smallest 1/2/5 x 10^k step that splits ``span`` into at most ~``target`` intervals."""
    if not math.isfinite(span) or span <= 0:
        return 1.0
    raw = span / max(int(target), 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * mag >= raw * (1 - 1e-9):
            return m * mag
    return 10.0 * mag


def _clean(v: float) -> float:
    """Drop float noise such as 0.30000000000000004 from tick values."""
    return float(f"{v:.12g}")


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Tick values at multiples of a 1/2/5 x 10^k step that lie within [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [_clean(lo)] if math.isfinite(lo) else []
    step = nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [_clean(k * step) for k in range(first, last + 1)]


def log_ticks(lo_log: float, hi_log: float, target: int = 6) -> list[float]:
    """Tick *values* (not logs) for a log axis spanning 10**lo_log .. 10**hi_log."""
    if hi_log - lo_log < 1.0:
        # Less than a decade: decade ticks would leave the axis bare; use linear nice ticks.
        return [v for v in nice_ticks(10**lo_log, 10**hi_log, target) if v > 0]
    k0, k1 = math.floor(lo_log) - 1, math.ceil(hi_log) + 1
    for mults in ((1.0, 2.0, 5.0), (1.0,)):
        vals = [
            _clean(m * 10.0**k)
            for k in range(k0, k1 + 1)
            for m in mults
            if lo_log - 1e-9 <= math.log10(m * 10.0**k) <= hi_log + 1e-9
        ]
        if len(vals) <= target + 2:
            return vals
    stride = math.ceil(len(vals) / (target + 1))
    return vals[::stride]


def format_tick(v: float, step: float | None = None) -> str:
    """Short label for a tick value; ``step`` (the tick spacing) sets the decimals."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        mant, _, exp = f"{v:.3g}".partition("e")
        return f"{mant}e{int(exp)}" if exp else mant
    if step is not None and step > 0:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return f"{v:.{decimals}f}"
    s = f"{v:.4g}"
    if "e" in s:
        s = f"{float(s):f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def _padded_range(values: np.ndarray, pad_frac: float = 0.04) -> tuple[float, float]:
    """Data range with a margin; a flat or empty series still gets a usable range."""
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        pad = abs(lo) * 0.05 if lo != 0 else 0.5
        return lo - pad, hi + pad
    pad = (hi - lo) * pad_frac
    return lo - pad, hi + pad


# ---------------------------------------------------------------------------------------
# Line plot
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlotArea:
    """Mapping from data to pixels of a ``line_plot``.

    ``left..right`` / ``top..bottom`` are the pixel bounds of the plotting rectangle; y data
    (log10 of it when ``log_y``) in ``y_lo..y_hi`` maps bottom-to-top.
    """

    left: int
    top: int
    right: int
    bottom: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    log_y: bool = False

    def x_px(self, x: float) -> float:
        return self.left + (x - self.x_lo) / (self.x_hi - self.x_lo) * (self.right - self.left)

    def y_px(self, y: float) -> float:
        v = math.log10(y) if self.log_y else y
        return self.bottom - (v - self.y_lo) / (self.y_hi - self.y_lo) * (self.bottom - self.top)

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return self.x_px(x), self.y_px(y)


def _finite_xy(
    xs: Sequence[float], ys: Sequence[float], log_y: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays of the series plus a mask of points that can be drawn."""
    x = np.asarray(xs, dtype=np.float64).reshape(-1)
    y = np.asarray(ys, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y lengths differ: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    if log_y:
        ok &= y > 0
    return x, y, ok


def _runs(ok: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive True values: a NaN breaks the line."""
    edges = np.diff(np.concatenate(([0], ok.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def line_plot(
    path: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    width: int = 800,
    height: int = 500,
    log_y: bool = False,
) -> PlotArea:
    """Write a PNG with one coloured line per series (e.g. train/val loss vs iteration).

    Non-finite points (and non-positive ones when ``log_y``) are skipped and break the line.
    Returns the data-to-pixel mapping used.
    """
    prepared = [(name, *_finite_xy(xs, ys, log_y)) for name, (xs, ys) in series.items()]
    all_x = np.concatenate([x[ok] for _, x, _, ok in prepared] or [np.zeros(0)])
    all_y = np.concatenate([y[ok] for _, _, y, ok in prepared] or [np.zeros(0)])
    if log_y:
        all_y = np.log10(all_y)
    x_lo, x_hi = _padded_range(all_x, 0.02)
    y_lo, y_hi = _padded_range(all_y, 0.05)

    c = Canvas(width, height)
    th = Canvas.text_height()
    top = 12 + (2 * th + 12 if title else 0)
    bottom = height - (10 + 5 + 4 + th + (10 + th if xlabel else 0)) - 1
    if bottom - top < 20:
        raise ValueError(f"plot size {width}x{height} is too small")
    ph = bottom - top

    if log_y:
        y_ticks = log_ticks(y_lo, y_hi, max(2, ph // 50))
        y_pos = [math.log10(v) for v in y_ticks]
        y_labels = [format_tick(v) for v in y_ticks]
    else:
        y_ticks = nice_ticks(y_lo, y_hi, max(2, ph // 50))
        y_pos = y_ticks
        step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else None
        y_labels = [format_tick(v, step) for v in y_ticks]
    label_w = max((Canvas.text_width(s) for s in y_labels), default=0)
    left = 10 + (th + 8 if ylabel else 0) + label_w + 4 + 5
    right = width - 1 - 20
    if right - left < 20:
        raise ValueError(f"plot size {width}x{height} is too small")
    area = PlotArea(left, top, right, bottom, x_lo, x_hi, y_lo, y_hi, log_y)

    x_ticks = nice_ticks(x_lo, x_hi, max(2, (right - left) // 90))
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else None

    # Grid and ticks.
    for v, lab in zip(y_pos, y_labels, strict=True):
        py = bottom - (v - y_lo) / (y_hi - y_lo) * ph
        c.line(left + 1, py, right - 1, py, _GRID)
        c.line(left - 5, py, left - 1, py, _AXIS)
        c.text(left - 8, py, lab, _TEXT, anchor="right", valign="middle")
    for v in x_ticks:
        px = area.x_px(v)
        c.line(px, top + 1, px, bottom - 1, _GRID)
        c.line(px, bottom + 1, px, bottom + 5, _AXIS)
        c.text(px, bottom + 9, format_tick(v, x_step), _TEXT, anchor="center")

    # Series.
    pixel_pts: list[np.ndarray] = []
    for i, (_, x, y, ok) in enumerate(prepared):
        color = PALETTE[i % len(PALETTE)]
        yv = np.log10(np.where(ok, y, 1.0)) if log_y else y
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (yv - y_lo) / (y_hi - y_lo) * ph
        pts = np.stack([px, py], axis=1)
        pixel_pts.append(pts[ok])
        for s, e in _runs(ok):
            if e - s == 1:
                c.fill_rect(px[s] - 2, py[s] - 2, px[s] + 3, py[s] + 3, color)
            else:
                c.polyline(pts[s:e], color, width=2)

    c.rect_outline(left, top, right + 1, bottom + 1, _AXIS)

    # Labels.
    if title:
        c.text((left + right) / 2, 12, title, _TEXT, scale=2, anchor="center")
    if xlabel:
        c.text((left + right) / 2, height - 10, xlabel, _TEXT, anchor="center", valign="bottom")
    if ylabel:
        c.text(10, (top + bottom) / 2, ylabel, _TEXT, valign="middle", rotate=True)

    if prepared:
        _draw_legend(c, area, [name for name, *_ in prepared], pixel_pts)
    c.save_png(path)
    return area


def _draw_legend(c: Canvas, area: PlotArea, names: list[str], pts: list[np.ndarray]) -> None:
    """Legend box in whichever inner corner covers the fewest data points."""
    row_h = 14
    w = 10 + 18 + 6 + max(Canvas.text_width(n) for n in names) + 10
    h = 6 + row_h * len(names) + 2
    inset = 8
    corners = [
        (area.right - inset - w, area.top + inset),
        (area.left + inset, area.top + inset),
        (area.right - inset - w, area.bottom - inset - h),
        (area.left + inset, area.bottom - inset - h),
    ]
    every = np.concatenate(pts) if pts else np.zeros((0, 2))

    def covered(corner: tuple[int, int]) -> int:
        x0, y0 = corner
        inside = (
            (every[:, 0] >= x0 - 4)
            & (every[:, 0] <= x0 + w + 4)
            & (every[:, 1] >= y0 - 4)
            & (every[:, 1] <= y0 + h + 4)
        )
        return int(inside.sum())

    x0, y0 = min(corners, key=covered)
    c.fill_rect(x0, y0, x0 + w, y0 + h, (255, 255, 255))
    c.rect_outline(x0, y0, x0 + w, y0 + h, (170, 170, 170))
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        cy = y0 + 6 + i * row_h + row_h // 2 - 1
        c.line(x0 + 10, cy, x0 + 28, cy, color, width=3)
        c.text(x0 + 34, cy, name, _TEXT, valign="middle")


# ---------------------------------------------------------------------------------------
# Timeline plot
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimelineArea:
    """Mapping from (time, row) to pixels of a ``timeline_plot``."""

    left: int
    right: int
    top: int
    row_height: int
    n_rows: int
    t_lo: float
    t_hi: float

    def t_px(self, t: float) -> float:
        return self.left + (t - self.t_lo) / (self.t_hi - self.t_lo) * (self.right - self.left)

    def row_band(self, row: int) -> tuple[int, int]:
        """[y0, y1) of the whole row."""
        y0 = self.top + row * self.row_height
        return y0, y0 + self.row_height

    def box_band(self, row: int) -> tuple[int, int]:
        """[y0, y1) that boxes of this row fill."""
        y0, y1 = self.row_band(row)
        return y0 + 4, y1 - 13

    @property
    def bottom(self) -> int:
        return self.top + self.n_rows * self.row_height


def _darker(color: Sequence[int], f: float = 0.6) -> Color:
    return (int(color[0] * f), int(color[1] * f), int(color[2] * f))


def _ink_for(color: Sequence[int]) -> Color:
    """Black or white text, whichever reads better on ``color``."""
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def timeline_plot(
    path: str,
    rows: Sequence[str],
    boxes: Sequence[tuple[int, float, float, Sequence[int], str]],
    markers: Sequence[tuple[int, float, str]] = (),
    title: str = "",
    xlabel: str = "time",
    width: int = 1200,
    row_height: int = 44,
    legend: Sequence[tuple[str, Sequence[int]]] = (),
) -> TimelineArea:
    """Write a PNG of per-row time intervals, e.g. a pipeline schedule.

    ``rows`` label each row (one per pipeline stage); ``boxes`` are
    ``(row, t_start, t_end, colour, label)`` with the label drawn inside when it fits;
    ``markers`` are ``(row, t, label)`` drawn as a dark vertical bar (optimizer steps);
    ``legend`` optionally lists ``(name, colour)`` swatches shown under the title.
    Returns the (time, row)-to-pixel mapping used.
    """
    n = len(rows)
    if n == 0:
        raise ValueError("timeline_plot needs at least one row")
    if row_height < 24:
        raise ValueError("row_height must be >= 24")
    times: list[float] = []
    for row, t0, t1, _, _ in boxes:
        if not 0 <= row < n:
            raise ValueError(f"box row {row} out of range for {n} rows")
        if not (math.isfinite(t0) and math.isfinite(t1)) or t1 < t0:
            raise ValueError(f"bad box interval [{t0}, {t1}]")
        times += [t0, t1]
    for row, t, _ in markers:
        if not 0 <= row < n:
            raise ValueError(f"marker row {row} out of range for {n} rows")
        if not math.isfinite(t):
            raise ValueError(f"bad marker time {t}")
        times.append(t)
    t_lo, t_hi = (min(times), max(times)) if times else (0.0, 1.0)
    if t_hi == t_lo:
        t_lo, t_hi = t_lo - 0.5, t_hi + 0.5
    span = t_hi - t_lo
    t_lo, t_hi = t_lo - 0.01 * span, t_hi + 0.01 * span

    th = Canvas.text_height()
    top = 12 + (2 * th + 12 if title else 0) + (th + 12 if legend else 0)
    bottom_margin = 5 + 4 + th + (10 + th if xlabel else 0) + 12
    height = top + n * row_height + bottom_margin
    left = 10 + max(Canvas.text_width(r) for r in rows) + 10
    right = width - 1 - 20
    if right - left < 40:
        raise ValueError(f"width {width} too small for the row labels")
    area = TimelineArea(left, right, top, row_height, n, t_lo, t_hi)
    c = Canvas(width, height)

    # Row backgrounds and labels.
    for r, name in enumerate(rows):
        y0, y1 = area.row_band(r)
        if r % 2 == 1:
            c.fill_rect(left, y0, right + 1, y1, (246, 246, 246))
        c.text(left - 8, (y0 + y1) / 2, name, _TEXT, anchor="right", valign="middle")

    # Time grid and axis ticks.
    ticks = nice_ticks(t_lo, t_hi, max(2, (right - left) // 100))
    step = ticks[1] - ticks[0] if len(ticks) > 1 else None
    for v in ticks:
        px = area.t_px(v)
        c.line(px, top, px, area.bottom - 1, _GRID)
        c.line(px, area.bottom + 1, px, area.bottom + 5, _AXIS)
        c.text(px, area.bottom + 9, format_tick(v, step), _TEXT, anchor="center")

    # Boxes.
    for row, t0, t1, color, label in boxes:
        by0, by1 = area.box_band(row)
        x0 = int(math.floor(area.t_px(t0) + 0.5))
        x1 = max(int(math.floor(area.t_px(t1) + 0.5)), x0 + 1)
        c.fill_rect(x0, by0, x1, by1, color)
        if x1 - x0 >= 4:
            c.rect_outline(x0, by0, x1, by1, _darker(color))
        if label:
            for scale in (2, 1):
                if Canvas.text_width(label, scale) <= x1 - x0 - 4 and (
                    Canvas.text_height(scale) <= by1 - by0 - 4
                ):
                    c.text(
                        (x0 + x1) / 2, (by0 + by1) / 2, label, _ink_for(color),
                        scale=scale, anchor="center", valign="middle",
                    )  # fmt: skip
                    break

    # Markers, with labels skipped where they would overlap the previous one in the row.
    last_label_end = [-(10**9)] * n
    for row, t, label in sorted(markers, key=lambda m: (m[0], m[1])):
        y0, y1 = area.row_band(row)
        px = area.t_px(t)
        c.fill_rect(px - 1, y0 + 2, px + 2, y1 - 11, (25, 25, 25))
        if label:
            tw = Canvas.text_width(label)
            lx = int(px) - tw // 2
            if lx > last_label_end[row] + 3:
                c.text(lx, y1 - 10, label, (25, 25, 25))
                last_label_end[row] = lx + tw

    c.rect_outline(left, top, right + 1, area.bottom + 1, _AXIS)

    # Title, legend, axis label.
    y = 12
    if title:
        c.text((left + right) / 2, y, title, _TEXT, scale=2, anchor="center")
        y += 2 * th + 12
    if legend:
        x = left
        for name, color in legend:
            c.fill_rect(x, y - 1, x + 14, y + th + 1, color)
            c.rect_outline(x, y - 1, x + 14, y + th + 1, _darker(color))
            c.text(x + 20, y, name, _TEXT)
            x += 20 + Canvas.text_width(name) + 18
    if xlabel:
        c.text((left + right) / 2, height - 12, xlabel, _TEXT, anchor="center", valign="bottom")
    c.save_png(path)
    return area
