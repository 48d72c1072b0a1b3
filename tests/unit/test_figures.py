"""Figures: the artists hold the data given, files are readable 0644 PNGs of a sane shape."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import matplotlib.image as mpimg
import pytest
from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D

from megatron_paci.utils.figures import (
    Box,
    TimelinePanel,
    loss_figure,
    save_figure,
    stacked_timeline_figure,
    timeline_figure,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Two stages, written out by hand: stage 1 forwards j after stage 0, backwards first.
BOXES = [
    Box(0, 0.0, 1.0, "F", 1),
    Box(0, 1.0, 2.0, "F", 2),
    Box(1, 1.0, 2.0, "F", 1),
    Box(1, 2.0, 4.0, "B", 1),
    Box(1, 4.0, 5.0, "F", 2),
    Box(0, 4.0, 6.0, "B", 1),
    Box(1, 5.0, 7.0, "B", 2),
    Box(1, 7.0, 7.0, "STEP", 1),
    Box(0, 7.0, 9.0, "B", 2),
    Box(0, 9.0, 9.0, "STEP", 1),
]


def box_patches(ax) -> list:
    """The rectangles the drawer made for boxes (they carry the box label as gid)."""
    return [p for p in ax.patches if p.get_gid()]


def legend_texts(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_timeline_rectangles_are_the_boxes() -> None:
    fig = timeline_figure(BOXES, 2, title="two stages")
    (ax,) = fig.axes
    patches = box_patches(ax)
    assert len(patches) == len(BOXES)
    for b, p in zip(BOXES, patches, strict=True):
        assert p.get_gid() == b.label
        assert p.get_x() == pytest.approx(b.start)
        assert p.get_width() == pytest.approx(b.end - b.start)
        assert round(p.get_y() + p.get_height() / 2) == b.row
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0", "stage 1"]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # stage 0 on top
    assert ax.get_title(loc="left") == "two stages"
    # Every F/B box is wide enough here for its micro-batch label; STEPs carry none.
    assert sorted(t.get_text() for t in ax.texts) == sorted(
        b.label for b in BOXES if b.kind != "STEP"
    )
    assert legend_texts(fig) == ["F forward", "B backward", "S step"]


def test_f_b_step_differ_beyond_hue() -> None:
    """F light, B dark, STEP a full-height bar: readable in grey as well."""
    (ax,) = timeline_figure(BOXES, 2).axes
    by_kind = {p.get_gid()[0]: p for p in box_patches(ax)}

    def luma(p) -> float:
        r, g, b = to_rgb(p.get_facecolor())
        return 0.299 * r + 0.587 * g + 0.114 * b

    assert luma(by_kind["F"]) > 0.6 > 0.4 > luma(by_kind["B"])
    assert luma(by_kind["S"]) < 0.1
    assert by_kind["S"].get_height() > by_kind["F"].get_height()


def test_labels_only_where_they_fit() -> None:
    boxes = [Box(0, 0.0, 100.0, "F", 1), Box(0, 100.0, 100.01, "F", 2)]
    (ax,) = timeline_figure(boxes, 1, width_px=800).axes
    assert [t.get_text() for t in ax.texts] == ["F1"]


def test_chunks_show_in_label_colour_and_legend() -> None:
    boxes = [Box(0, 0.0, 1.0, "F", 3, chunk=0), Box(0, 1.0, 2.0, "F", 3, chunk=1),
             Box(0, 2.0, 4.0, "B", 3, chunk=1), Box(0, 4.0, 5.0, "W", 3, chunk=1)]  # fmt: skip
    fig = timeline_figure(boxes, 1)
    (ax,) = fig.axes
    patches = box_patches(ax)
    assert [p.get_gid() for p in patches] == ["F3c0", "F3c1", "B3c1", "W3c1"]
    assert {t.get_text() for t in ax.texts} == {"F3c0", "F3c1", "B3c1", "W3c1"}
    assert patches[0].get_facecolor() != patches[1].get_facecolor()
    assert patches[3].get_hatch()  # an unknown kind is told apart by a hatch too
    assert "F forward, chunk 1" in legend_texts(fig)
    assert "W action, chunk 1" in legend_texts(fig)


def test_stacked_panels_share_the_time_axis() -> None:
    other = [Box(0, 0.0, 1.0, "F", 1), Box(0, 1.0, 21.0, "B", 1), Box(2, 21.0, 21.0, "STEP", 1)]
    fig = stacked_timeline_figure(
        [TimelinePanel(BOXES, 2, "first"), TimelinePanel(other, 3, "second")], xlabel="s"
    )
    top, bottom = fig.axes
    assert [a.get_title(loc="left") for a in fig.axes] == ["first", "second"]
    assert top.get_xlim() == bottom.get_xlim()
    assert top.get_xlim()[0] <= 0.0 and top.get_xlim()[1] >= 21.0
    assert [p.get_x() for p in box_patches(bottom)] == [0.0, 1.0, 21.0]
    assert [round(p.get_y() + p.get_height() / 2) for p in box_patches(bottom)] == [0, 0, 2]
    assert len(box_patches(top)) == len(BOXES)
    assert bottom.get_xlabel() == "s" and top.get_xlabel() == ""
    # Three rows get more height than two.
    assert bottom.get_position().height > top.get_position().height
    assert len(fig.legends) == 1


@pytest.mark.parametrize("stages, actions", [(2, 40), (4, 30), (2, 2000), (8, 200)])
def test_timeline_png_readable_with_sane_aspect(tmp_path, stages, actions) -> None:
    boxes = [Box(s, s + 3.0 * i, s + 3.0 * i + (1.0 if i % 2 == 0 else 2.0),
                 "F" if i % 2 == 0 else "B", i // 2 + 1)
             for s in range(stages) for i in range(actions)]  # fmt: skip
    path = tmp_path / "t.png"
    old = os.umask(0o077)  # a private umask must not make the plot private
    try:
        w, h = save_figure(timeline_figure(boxes, stages, "t"), str(path))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    img = mpimg.imread(path)
    assert img.shape[:2] == (h, w)
    assert 2.0 <= w / h <= 5.0
    assert h >= 40 * stages


def test_explicit_width(tmp_path) -> None:
    w, h = save_figure(timeline_figure(BOXES, 2, width_px=1000), str(tmp_path / "w.png"))
    assert mpimg.imread(tmp_path / "w.png").shape[:2] == (h, 1000) == (h, w)


@pytest.mark.parametrize(
    "boxes, rows, match",
    [
        ([Box(2, 0.0, 1.0, "F", 1)], 2, "F1 row 2 outside 0..1"),
        ([Box(0, 2.0, 1.0, "B", 4)], 1, r"B4 has a bad interval \[2.0, 1.0\]"),
        ([Box(0, 0.0, math.inf, "F", 1)], 1, "bad interval"),
        ([], 0, "at least one row"),
    ],
)
def test_bad_timelines_refused(boxes, rows, match) -> None:
    with pytest.raises(ValueError, match=match):
        timeline_figure(boxes, rows, title="sched")


def test_loss_figure_plots_the_losses(tmp_path) -> None:
    it = [1, 2, 3, 4, 5, 6]
    loss = [9.0, 7.5, 6.0, math.inf, 5.0, 4.5]
    fig = loss_figure((it, loss), ([3, 6], [6.5, 5.25]))
    (ax,) = fig.axes
    train, val = [a for a in ax.get_children() if isinstance(a, Line2D) and a.get_label()[0] != "_"]
    assert list(train.get_xdata()) == it
    y = list(train.get_ydata())
    assert y[:3] + y[4:] == [9.0, 7.5, 6.0, 5.0, 4.5] and math.isnan(y[3])
    assert list(val.get_xdata()) == [3, 6] and list(val.get_ydata()) == [6.5, 5.25]
    assert val.get_marker() == "o"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss",
                                                                    "validation loss"]
    assert ax.get_title() == "language-model loss"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("iteration", "loss")
    assert ax.get_ylim()[1] < 20  # the inf did not stretch the axis
    w, h = save_figure(fig, str(tmp_path / "loss.png"))
    assert mpimg.imread(tmp_path / "loss.png").shape[:2] == (h, w) == (500, 800)
    assert os.stat(tmp_path / "loss.png").st_mode & 0o777 == 0o644


def test_loss_figure_without_validation() -> None:
    (ax,) = loss_figure(([1, 2], [3.0, 2.0])).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss"]
    with pytest.raises(ValueError, match="train loss: 2 iterations for 1 values"):
        loss_figure(([1, 2], [3.0]))


def test_importing_package_and_simulator_leaves_matplotlib_out() -> None:
    code = ("import sys, megatron_paci, megatron_paci.utils.figures, "
            "megatron_paci.pipeline.simulate as s; "
            "s.simulate('paci', 2, 2, 1); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_seed_band_figure_plots_the_mean_and_the_seed_range(tmp_path):
    from megatron_paci.utils.figures import SeedRuns, save_figure, seed_band_figure

    flush = SeedRuns("1f1b_flush", [1, 2, 3], [[5.0, 4.0, 3.0], [5.2, 4.4, 3.2]])
    paci = SeedRuns("paci", [1, 2, 3], [[5.1, 4.1, 3.1], [5.1, 4.3, 3.3]])
    fig = seed_band_figure([("tokens", [flush, paci]), ("seconds", [flush])])
    by_tokens, by_time = fig.axes
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in by_tokens.get_lines()}
    assert lines["1f1b_flush (mean of 2 seeds)"] == pytest.approx([5.1, 4.2, 3.1])
    assert lines["paci (mean of 2 seeds)"] == pytest.approx([5.1, 4.2, 3.2])
    band = by_tokens.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(3.0) and max(band) == pytest.approx(5.2)
    assert by_tokens.get_xlabel() == "tokens" and by_time.get_xlabel() == "seconds"
    w, h = save_figure(fig, str(tmp_path / "cmp.png"))
    assert w > h > 0
    with pytest.raises(ValueError, match="every seed needs one value per x"):
        seed_band_figure([("tokens", [SeedRuns("bad", [1, 2], [[1.0]])])])
