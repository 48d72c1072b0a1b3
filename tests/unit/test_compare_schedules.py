"""The comparison's rules (target, time to target, the difference rule, the table) on
synthetic metrics, against numbers worked out by hand in the comments."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_schedules.py"
spec = importlib.util.spec_from_file_location("_compare_schedules", SCRIPT)
cs = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cs  # dataclasses look their module up there
spec.loader.exec_module(cs)


def test_crossing_is_linear_between_evaluations():
    xs, ys = [100, 200, 300], [5.0, 4.0, 3.0]
    assert cs.crossing(xs, ys, 3.5) == pytest.approx(250.0)  # 200 + 100 * 0.5 / 1
    assert cs.crossing(xs, ys, 4.0) == pytest.approx(200.0)
    assert cs.crossing(xs, ys, 6.0) == 100  # already below at the first evaluation
    assert cs.crossing(xs, ys, 2.0) is None


def test_difference_rule_is_non_overlapping_ranges():
    assert cs.differs([1.0, 2.0, 3.0], [3.5, 4.0])
    assert cs.differs([3.5, 4.0], [1.0, 2.0, 3.0])
    assert not cs.differs([1.0, 2.0, 3.0], [2.5, 4.0])
    assert not cs.differs([1.0, 2.0], [2.0, 3.0])  # touching ranges overlap


def test_parse_metrics_places_val_loss_at_its_iteration():
    rows = []
    for i in range(1, 5):
        rows.append({"iteration": i, "loss": 6.0 - i, "tokens": 512 * i, "elapsed_s": 1.5 * i,
                     "tokens_per_s": 100.0 * i, "ms_per_iter": 10.0 * i})
        if i % 2 == 0:
            rows.append({"iteration": i, "peak_rss_mb": [300.0 + i, 200.0],
                         "action_ms": {"F": [1.0, 2.0], "B": [3.0, 4.0], "S": [0.5, 0.5]},
                         "max_drift": [i // 2, 0]})
            rows.append({"iteration": i, "val_loss": 5.0 - i / 10})
    r = cs.parse_metrics(rows, "x", 1, warmup=2)
    assert r.evals == [(1024.0, 3.0, 4.8), (2048.0, 6.0, 4.6)]
    assert r.tokens_per_s == pytest.approx(350.0)  # median of iterations 3 and 4
    assert r.ms_per_iter == pytest.approx(35.0)
    assert r.peak_rss_mb == [304.0, 200.0]
    assert r.max_drift == [2, 0]
    assert r.final_loss == pytest.approx(4.6)


def _run(label, seed, losses, elapsed, tps, rss=(400.0, 300.0), drift=(0, 0)):
    evals = [(1000.0 * (i + 1), e, v) for i, (e, v) in enumerate(zip(elapsed, losses, strict=True))]
    return cs.RunResult(label, seed, evals, tps, list(rss), list(drift))


def test_summary_target_times_and_table_by_hand():
    results = [
        _run("flush", 1, [4.6, 4.0], [10, 20], 1000.0),
        _run("flush", 2, [4.8, 4.2], [12, 22], 1100.0),
        _run("paci", 1, [4.5, 4.0], [8, 16], 1300.0, drift=(1, 0)),
        _run("paci", 2, [4.3, 3.9], [10, 18], 1250.0, rss=(420.0, 290.0), drift=(1, 0)),
    ]
    target, rows = cs.summarise(results, ["flush", "paci"])
    assert target == pytest.approx(4.1)  # mean of flush's finals 4.0 and 4.2
    flush, paci = rows
    # flush mean curve [4.7, 4.1] reaches 4.1 at its last evaluation: 2000 tokens, 21 s.
    assert flush.tokens_to_target == pytest.approx(2000.0)
    assert flush.seconds_to_target == pytest.approx(21.0)
    # paci mean curve [4.4, 3.95]: 1000 + 1000 * 0.3 / 0.45 tokens; 9 + 8 * 0.3 / 0.45 s.
    assert paci.tokens_to_target == pytest.approx(1000 + 1000 * 0.3 / 0.45)
    assert paci.seconds_to_target == pytest.approx(9 + 8 * 0.3 / 0.45)
    assert flush.final[1] == pytest.approx(math.sqrt(0.02))  # sample std of 4.0, 4.2
    assert not paci.loss_differs  # [3.9, 4.0] overlaps [4.0, 4.2]
    assert paci.speed_differs  # [1250, 1300] vs [1000, 1100]
    assert paci.peak_rss_mb == [420.0, 300.0]
    assert paci.max_drift == [1, 0]
    text = cs.results_table(target, rows)
    assert "1.20x" in text  # 2000 / 1666.7 tokens
    assert "1.47x" in text  # 21 / 14.33 s
    assert "4.100 ± 0.141 [4.000..4.200]" in text
    assert "3.950 ± 0.071 [3.900..4.000] (same)" in text
    assert "1275 ± 35 (differs)" in text
    assert "420 / 300" in text and "| 1 / 0 |" in text


def test_a_schedule_that_never_reaches_the_target():
    results = [_run("flush", 1, [4.6, 4.0], [10, 20], 1000.0),
               _run("flush", 2, [4.6, 4.0], [10, 20], 1000.0),
               _run("2bw", 1, [5.0, 4.5], [10, 20], 1000.0),
               _run("2bw", 2, [5.1, 4.6], [10, 20], 1000.0)]
    target, rows = cs.summarise(results, ["flush", "2bw"])
    assert rows[1].tokens_to_target is None and rows[1].loss_differs
    assert "not reached" in cs.results_table(target, rows)


def test_seeds_must_share_evaluation_points():
    a = _run("x", 1, [4.0, 3.0], [1, 2], 1.0)
    b = cs.RunResult("x", 2, [(1000.0, 1, 4.0), (3000.0, 2, 3.0)], 1.0, [1.0], [0])
    with pytest.raises(ValueError, match="other token counts"):
        cs.mean_curve([a, b])


def test_block_means():
    assert cs.block_means([1, 2, 3, 4, 5, 6], 2, 4) == [1.5, 3.5, 5.5]
    assert cs.block_means([1, 2, 3, 4, 5, 6], 2, 6) == [2.0, 5.0]
    assert cs.block_means([1, 2, 3, 4, 5, 6, 7], 1, 3) == [2.0, 5.0]  # part block dropped
    with pytest.raises(ValueError, match="multiple of window"):
        cs.block_means([1, 2], 2, 3)


def test_a_smaller_paci_window_sees_the_same_tokens_and_lr_per_token(tmp_path):
    args = argparse.Namespace(window=4, iters=100, eval_interval=10, warmup=10,
                              micro_batch_size=8, num_layers=4, hidden=64, seq_length=64,
                              clip_grad=0.0, lr=3e-3)
    runs = {v.window: cs.run_overrides(args, v, 1, ("d", "t"), tmp_path / "r")
            for v in cs.variants(4, [1, 2, 4]) if v.chunks == 1}
    for a, o in runs.items():
        assert int(o["train.iters"]) * int(o["train.global_batch_size"]) == 100 * 32
        assert int(o["train.eval_interval"]) * a == 40  # every 40 micro-batches
        assert int(o["optim.lr_warmup_iters"]) * a == 40
        assert int(o["train.eval_iters"]) * a == cs.EVAL_MICRO_BATCHES
        assert o["model.tie_embeddings"] == "false" and o["optim.clip_grad"] == "0.0"
    assert runs[1]["train.iters"] == "400" and runs[1]["train.global_batch_size"] == "8"


def test_variants_are_the_issues_list():
    vs = cs.variants(4, [1, 2, 4])
    assert [(v.window, v.chunks) for v in vs] == [(4, 1), (4, 2), (4, 1), (4, 1), (1, 1),
                                                  (2, 1)]
    assert len({v.label for v in vs}) == len(vs)
    assert [v.window for v in cs.variants(4, [1, 2, 4], quick=True)] == [4, 4]


def test_projected_speedup_is_the_bubble_ratio_without_step_or_p2p():
    # With F=1, B=2 and nothing else, flush's window of M takes (M+P-1)(F+B) and PACI's
    # M(F+B) in steady state: the ratio is (M+P-1)/M.
    for m in (8, 16):
        got = cs.projected_speedups(cs.Costs(1.0, 2.0, 0.0, 0.0), 8, m, [m])[m]
        assert got == pytest.approx((m + 7) / m, rel=1e-6)
