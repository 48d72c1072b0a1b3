"""Simulator checked against analytical results for 1F1B pipelines, plus the PNG and CLI."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import pytest

from megatron_paci.pipeline.schedules import SCHEDULES, build_schedule, peak_in_flight
from megatron_paci.pipeline.simulate import (
    Costs,
    bubble_fraction,
    draw,
    draw_stacked,
    main,
    peak_in_flight_per_stage,
    project,
    simulate,
    steady_state_bubble,
    throughput,
)

UNIT = Costs(forward=1.0, backward=2.0, step=0.0, p2p=0.0)


def check_dependencies(tl, costs_of) -> None:
    """Every event respects its stage's order and the cross-stage F/B/STEP rules."""
    ends: dict[tuple[int, str, int], tuple[float, float]] = {}
    last_end = [0.0] * tl.stages
    for s, a, t0, t1 in sorted(tl.events, key=lambda e: (e[0], e[2])):
        c = costs_of(s)
        assert t0 >= last_end[s] - 1e-12
        assert t1 - t0 == pytest.approx(c.of(a))
        last_end[s] = t1
        ends[(s, a.kind, a.index)] = (t0, t1)
    for (s, kind, j), (t0, _) in ends.items():
        c = costs_of(s)
        if kind == "F" and s > 0:
            assert t0 >= ends[(s - 1, "F", j)][1] + c.p2p - 1e-12
        if kind == "B" and s < tl.stages - 1:
            assert t0 >= ends[(s + 1, "B", j)][1] + c.p2p - 1e-12
        if kind == "STEP" and tl.schedule == "1f1b_flush":
            # global: starts together everywhere, after every stage finished the window
            starts = {ends[(r, "STEP", j)][0] for r in range(tl.stages)}
            assert starts == {t0}
            for r in range(tl.stages):
                done = max(e for (q, k, i), (_, e) in ends.items()
                           if q == r and k != "STEP" and i <= j * tl.window)  # fmt: skip
                assert t0 >= done - 1e-12


@pytest.mark.parametrize("p, m", [(1, 3), (2, 2), (2, 4), (4, 4), (4, 2), (8, 8), (5, 1)])
def test_flush_bubble_is_analytical(p: int, m: int) -> None:
    # One window of 1F1B: makespan = (M + P - 1) * (F + B), so idle share = (P-1)/(M+P-1).
    tl = simulate("1f1b_flush", p, m, 1, UNIT)
    assert tl.makespan == (m + p - 1) * 3.0
    assert bubble_fraction(tl) == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    # Windows are separated by the flush, so more windows keep the same share.
    tl3 = simulate("1f1b_flush", p, m, 3, UNIT)
    assert tl3.makespan == 3 * (m + p - 1) * 3.0
    assert bubble_fraction(tl3) == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


@pytest.mark.parametrize("name", ["pipedream_2bw", "paci"])
@pytest.mark.parametrize("p, m, w", [(2, 2, 5), (4, 4, 3), (4, 3, 6), (3, 8, 4)])
def test_async_bubble_only_at_the_ends(name: str, p: int, m: int, w: int) -> None:
    # One 1F1B over all N = m*w micro-batches: fill and drain happen once.
    n = m * w
    tl = simulate(name, p, m, w, UNIT)
    assert tl.makespan == (n + p - 1) * 3.0
    assert bubble_fraction(tl) == pytest.approx((p - 1) / (n + p - 1), abs=1e-12)
    assert steady_state_bubble(tl) == pytest.approx(0.0, abs=1e-12)


def test_paci_small_window_deep_pipe_steady_state() -> None:
    tl = simulate("paci", 8, 2, 12, UNIT)  # a < P-1: still bubble-free between fill and drain
    assert steady_state_bubble(tl) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("p, m", [(2, 2), (4, 4), (3, 2)])
def test_flush_steady_state_bubble(p: int, m: int) -> None:
    tl = simulate("1f1b_flush", p, m, 5, UNIT)
    assert steady_state_bubble(tl) == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


def test_steady_state_needs_three_windows() -> None:
    assert math.isnan(steady_state_bubble(simulate("paci", 2, 2, 2, UNIT)))


@pytest.mark.parametrize("m, ratio", [(2, 1.5), (4, 1.25)])
def test_throughput_ratio_paci_over_flush(m: int, ratio: float) -> None:
    # P=2: flush pays (M+1)*3 per window, PACI 3*M in steady state.
    w = 60
    paci = throughput(simulate("paci", 2, m, w, UNIT), m * w)
    flush = throughput(simulate("1f1b_flush", 2, m, w, UNIT), m * w)
    assert paci / flush == pytest.approx(ratio, rel=0.05)


def test_dependencies_hold_with_p2p_step_and_uneven_stages() -> None:
    per_stage = [Costs(1.0, 2.0, 0.5, 0.25), Costs(1.5, 3.0, 0.2, 0.25),
                 Costs(0.7, 1.1, 0.0, 0.4)]  # fmt: skip
    for name in SCHEDULES:
        tl = simulate(name, 3, 2, 4, per_stage_costs=per_stage)
        check_dependencies(tl, lambda s: per_stage[s])
        assert len(tl.events) == 3 * (2 * 8 + 4)
    for name in SCHEDULES:
        c = Costs(1.0, 2.0, 0.3, 0.1)
        tl = simulate(name, 4, 4, 3, c)
        check_dependencies(tl, lambda s, c=c: c)


def test_flush_step_is_global_async_step_is_local() -> None:
    c = Costs(1.0, 2.0, 1.0, 0.0)
    flush = simulate("1f1b_flush", 3, 2, 2, c)
    s1 = [t0 for _, a, t0, _ in flush.events if str(a) == "S1"]
    assert len(s1) == 3 and len(set(s1)) == 1
    paci = simulate("paci", 3, 2, 2, c)
    s1 = [t0 for _, a, t0, _ in paci.events if str(a) == "S1"]
    assert len(set(s1)) == 3  # each stage steps when its own window is done


def test_slowest_stage_sets_throughput() -> None:
    per_stage = [UNIT, Costs(2.0, 4.0), UNIT]
    tl = simulate("paci", 3, 4, 40, per_stage_costs=per_stage)
    assert throughput(tl) == pytest.approx(1 / 6.0, rel=0.05)


def test_peak_in_flight_per_stage_matches_lists() -> None:
    for name in SCHEDULES:
        tl = simulate(name, 4, 3, 3, UNIT)
        expected = [peak_in_flight(build_schedule(name, 4, s, 3, 3)) for s in range(4)]
        assert peak_in_flight_per_stage(tl) == expected
        assert all(v <= 4 - s for s, v in enumerate(expected))


def test_project_rows() -> None:
    rows = project("paci", [4, 8, 16, 32], 8, 4, UNIT)
    assert [r["stages"] for r in rows] == [4, 8, 16, 32]
    for r in rows:
        p, n = r["stages"], 32
        assert r["bubble"] == pytest.approx((p - 1) / (n + p - 1), abs=1e-12)
        assert r["throughput"] == pytest.approx(n / ((n + p - 1) * 3.0))
        assert r["peak_in_flight"] == [min(p - s, n) for s in range(p)]
        # design.md: v_B = (j-1)//a, v_F = max(0, j-(P-s))//a, over the 32 micro-batches run
        assert r["max_drift"] == [max((j - 1) // 8 - max(0, j - (p - s)) // 8
                                      for j in range(1, n + 1)) for s in range(p)]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown pipeline.schedule"):
        simulate("gpipe", 2, 2, 1, UNIT)
    with pytest.raises(ValueError, match="m >= P-1"):
        simulate("pipedream_2bw", 4, 2, 1, UNIT)
    with pytest.raises(ValueError, match="3 stages"):
        simulate("paci", 3, 2, 1, per_stage_costs=[UNIT])
    with pytest.raises(ValueError, match=">= 0"):
        Costs(forward=-1.0)
    empty = simulate("paci", 2, 2, 0, UNIT)
    assert empty.makespan == 0.0 and bubble_fraction(empty) == 0.0


def test_draw_writes_readable_png(tmp_path) -> None:
    tl = simulate("paci", 4, 4, 3, UNIT)
    path = tmp_path / "t.png"
    assert draw(tl, str(path), "paci P=4", width=900) == 900
    h, w = mpimg.imread(path).shape[:2]
    assert w == 900 and h > 4 * 40  # a readable row per stage
    # default width grows with the run so labels fit, within a readable aspect ratio
    w = draw(tl, str(tmp_path / "auto.png"), "auto")
    h, w_read = mpimg.imread(tmp_path / "auto.png").shape[:2]
    assert w_read == w and 2.0 <= w / h <= 5.0


def test_draw_stacked_one_figure_for_all_schedules(tmp_path) -> None:
    tls = [simulate(name, 4, 4, 3, UNIT) for name in SCHEDULES]
    path = tmp_path / "all.png"
    w = draw_stacked(tls, str(path))
    h, w_read = mpimg.imread(path).shape[:2]
    assert w_read == w and h > len(tls) * 4 * 40
    with pytest.raises(ValueError, match="2 titles for 3 timelines"):
        draw_stacked(tls, str(path), titles=["a", "b"])


def test_draw_boxes_are_the_simulated_events(tmp_path, monkeypatch) -> None:
    from megatron_paci.utils import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.append(fig) or (1, 1))
    tl = simulate("1f1b_flush", 3, 3, 2, UNIT)
    draw(tl, str(tmp_path / "t.png"), "flush")
    (ax,) = drawn[0].axes
    patches = [p for p in ax.patches if p.get_gid()]
    got = sorted((round(p.get_y() + p.get_height() / 2), p.get_x(), p.get_width(), p.get_gid())
                 for p in patches)  # fmt: skip
    want = sorted((s, t0, t1 - t0, str(a)) for s, a, t0, t1 in tl.events)
    assert got == want
    assert ax.get_title(loc="left") == "flush"
    assert drawn[0].axes[-1].get_xlabel() == "time (forward = 1)"


def test_draw_shows_chunks_only_when_several(tmp_path, monkeypatch) -> None:
    """An interleaved timeline (several chunks per rank) labels each box with its chunk."""
    from megatron_paci.pipeline.actions import F
    from megatron_paci.pipeline.simulate import Timeline
    from megatron_paci.utils import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.append(fig) or (1, 1))
    for chunks, labels in [(2, ["F1c0", "F1c1"]), (1, ["F1", "F1"])]:
        events = [(0, F(1, c % chunks), float(c), c + 1.0) for c in range(2)]
        draw(Timeline("x", 1, 1, 1, events, chunks), str(tmp_path / "c.png"))
        assert [p.get_gid() for p in drawn[-1].axes[0].patches if p.get_gid()] == labels


def test_cli_writes_png_and_prints_bubble(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--schedule", "paci", "--stages", "8", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "simulate_out" / "timeline_paci_P8_M8.png"  # never the cwd itself
    assert png.exists() and mpimg.imread(png).ndim == 3
    assert [p.name for p in tmp_path.iterdir()] == ["simulate_out"]
    assert "wrote simulate_out/timeline_paci_P8_M8.png" in out
    # 4 windows by default: N = 32, bubble = 7/39
    assert f"{7 / 39:.3f}" in out and "paci" in out


def test_cli_all_compares_three(tmp_path, capsys) -> None:
    out_png = str(tmp_path / "cmp.png")
    assert main(["--schedule", "all", "--stages", "4", "--microbatches", "4", "--windows", "3",
                 "--output", out_png]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for name in SCHEDULES:
        assert name in out
        assert (tmp_path / f"cmp_{name}.png").exists()
    assert f"{3 / 7:.3f}" in out  # flush
    assert f"{3 / 15:.3f}" in out  # 2BW and PACI


def test_cli_output_folder(tmp_path, capsys) -> None:
    folder = tmp_path / "plots"  # created on demand
    assert main(["--schedule", "all", "--windows", "2", "--output", str(folder)]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in folder.iterdir())
    want = [f"timeline_{n}_P4_M4.png" for n in SCHEDULES]
    want += ["timeline_1f1b_flush_v2_P4_M4.png", "timeline_paci_v2_P4_M4.png",
             "timeline_all_P4_M4.png"]  # + the stack
    assert names == sorted(want)
    # Interleaved 2BW needs m >= 2P = 8 at P=4: named, not drawn.
    assert "pipedream_2bw v=2 skipped: PipeDream-2BW with parallel.virtual_pipeline=2" in out
    assert "use m >= 8" in out
    for name in names:
        assert f"wrote {folder / name}" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--schedule", "gpipe"], "unknown pipeline.schedule"),
        (["--schedule", "pipedream_2bw", "--stages", "4", "--microbatches", "2"], "m >= P-1"),
        (["--schedule", "paci", "--microbatches", "0"], "a window of zero"),
        (["--schedule", "paci", "--forward", "-1"], ">= 0"),
    ],
)
def test_cli_errors(argv: list[str], match: str, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
    assert not list(tmp_path.iterdir())
