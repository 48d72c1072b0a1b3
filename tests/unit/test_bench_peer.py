"""scripts/bench_peer.py stays runnable and fair: the peer model has the project's shape
(parameter count, whole and per stage), the plain peer loop trains, the commands give both
sides the same work per step, and the report's ratios are medians of per-round ratios.

Its real runs take minutes on an idle machine (docs/benchmarks.md); the P=2 launches run in
tests/integration/test_documented_commands.py (``--quick`` on two of them).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from megatron_paci.config import parse_args

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("_bench_peer", SCRIPTS / "bench_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _count_by_formula(s) -> int:
    """GPT parameters written out: embeddings, per layer 2 LNs + qkv + proj + fc1 + fc2,
    final LN, untied head."""
    h, f = s.hidden, s.ffn
    layer = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    return s.vocab * h + s.seq * h + s.num_layers * layer + 2 * h + h * s.vocab


@pytest.mark.parametrize("shape", ["small", "compute"])
def test_peer_and_project_models_have_the_same_parameters(bench, shape):
    s = bench.SHAPES[shape]
    whole, stages = bench.check_parameter_counts(s)  # asserts project == peer, per stage too
    assert whole == _count_by_formula(s)
    assert sum(stages) == whole and len(stages) == bench.P
    peer = bench.peer_model(s)
    assert sum(p.numel() for p in peer.parameters()) == whole


def test_plain_peer_loop_trains(bench):
    s = bench.SHAPES["small"]
    torch.set_num_threads(1)
    losses = bench.plain_loop(s, 2, 3, clip=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # Uniform random tokens: a near-uniform prediction (init std 0.02) costs about
    # ln(2047), and nothing better is learnable; the updates move the loss all the same.
    assert all(abs(x - math.log(2047)) < 0.1 for x in losses)
    assert len(set(losses)) > 1


def test_project_commands_do_the_peers_work(bench, tmp_path):
    s = bench.SHAPES["small"]
    for c in bench.CONFIGS:
        if c.side != "project":
            continue
        cmd = bench.command(c, s, 4, 10, "DATA", tmp_path / c.name)
        args = cmd[cmd.index("pretrain_gpt.py") + 1:]
        cwd = os.getcwd()
        os.chdir(SCRIPTS.parent)
        try:
            cfg, _ = parse_args(args)
        finally:
            os.chdir(cwd)
        m, t, o = cfg.model, cfg.train, cfg.optim
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == \
            (s.num_layers, s.hidden, s.heads, s.seq)
        assert not m.tie_embeddings and m.dropout == m.attention_dropout == 0
        assert t.global_batch_size == 4 * t.micro_batch_size == 4 * s.micro_batch
        assert o.lr_decay_style == "constant" and o.lr_warmup_iters == 0 and o.lr == bench.LR
        assert o.clip_grad == (bench.CLIP if c.clip else 0)
        assert (cfg.parallel.pipeline, cfg.parallel.virtual_pipeline) == (c.procs, c.chunks)
        assert t.eval_interval == 0 and cfg.logging.interval == 1
        if c.procs > 1 and c.chunks == 1:
            assert cfg.pipeline.layers_per_stage == list(s.split)


def test_report_takes_the_median_of_per_round_ratios(bench):
    Run = bench.Run
    flush = [100.0, 200.0, 300.0]
    peer = [50.0, 400.0, 150.0]
    runs = [Run("project_flush", "small", 2, k + 1, x, 1.0, 2.0, [1.0, 2.0])
            for k, x in enumerate(flush)]
    runs += [Run("peer_1f1b", "small", 2, k + 1, x, 1.0, 2.0, [3.0, 4.0])
             for k, x in enumerate(peer)]
    got = bench.round_ratios(runs, "small", 2, "project_flush", "peer_1f1b")
    assert got == [2.0, 0.5, 2.0]
    # Not the ratio of medians (200 / 150): a median of within-round ratios.
    assert statistics.median(got) == 2.0
    args = bench.parse(["--shapes", "small", "--micro-batches", "2"])
    text = bench.report(runs, args)
    assert "| project_flush / peer_1f1b | 2.00 / 0.50 / 2.00 | **2.00** | 1.00 | met |" in text
    assert "| peer_1f1b | 50 / 400 / 150 | 150 | 3 / 4 |" in text


def test_limit_is_total_stage_cost_over_the_slowest_and_reached_is_per_round(bench):
    # metrics.jsonl's action_ms: mean ms per action, per stage; interleaved ranks run 2 F
    # and 2 B per micro-batch; the STEP is spread over M=4 micro-batches
    costs = bench.stage_costs({"F": [2.0, 3.0], "B": [4.0, 5.0], "S": [8.0, 4.0]}, 4, 1)
    assert costs == [2 + 4 + 2, 3 + 5 + 1]
    assert bench.stage_costs({"F": [1.0], "B": [2.0], "S": [4.0]}, 4, 2) == [2 * 3 + 1]
    assert bench.pipeline_limit([8.0, 9.0]) == 17 / 9
    Run = bench.Run
    one = [Run("project_1p", "small", 4, k, x, 1.0, 2.0, [1.0], 0.0, [c])
           for k, x, c in ((1, 100.0, 20.0), (2, 200.0, 18.0))]
    # round 1: 150 tokens/s = 1.5x, limit 2 -> 75%; round 2: 300 = 1.5x, limit 1.5 -> 100%
    paci = [Run("project_paci", "small", 4, 1, 150.0, 1.0, 2.0, [1.0, 1.0], 0.0, [5.0, 5.0]),
            Run("project_paci", "small", 4, 2, 300.0, 1.0, 2.0, [1.0, 1.0], 0.0, [4.0, 2.0])]
    text = "\n".join(bench.limit_table(one + paci, "small", 4))
    assert "| project_paci | 4.50 / 3.50 | 2.00 / 1.50 | 1.50 / 1.50 | 0.75 / 1.00 | **88%** |" \
        in text
    assert "| project_1p (whole model, for reference) | 20.00 / 18.00 | - |" in text


def test_paci_over_flush_is_set_against_what_the_stage_costs_allow(bench):
    # Worked by hand, P=2, M=2, no STEP cost. Equal stages (F=1, B=2): the flush's window
    # is F1 F2 on stage 0, stage 1's F1 B1, then B1 B2 on stage 0 behind stage 1's F2 B2:
    # (M + P - 1) * 3 = 9; PACI's steady window is M * 3 = 6.
    equal = {"F": [1.0, 1.0], "B": [2.0, 2.0], "S": [0.0, 0.0]}
    assert bench.simulated_window_ms("1f1b_flush", equal, 2) == pytest.approx(9.0)
    assert bench.simulated_window_ms("paci", equal, 2) == pytest.approx(6.0)
    # Stage 0 twice as slow (F=2, B=4): stage 0 runs F1 [0,2] F2 [2,4], waits for stage 1's
    # B1 (ends at 5), B1 [5,9], B2 [9,13]: 13; PACI is bound by stage 0's 6 per
    # micro-batch: 12. So 13/12, far below (M+1)/M = 1.5.
    unequal = {"F": [2.0, 1.0], "B": [4.0, 2.0], "S": [0.0, 0.0]}
    assert bench.simulated_window_ms("1f1b_flush", unequal, 2) == pytest.approx(13.0)
    assert bench.simulated_window_ms("paci", unequal, 2) == pytest.approx(12.0)
    Run = bench.Run
    runs = [Run("project_flush", "small", 2, 1, 100.0, 1.0, 2.0, [1.0, 1.0], 0.0, [6.0, 3.0],
                unequal),
            Run("project_paci", "small", 2, 1, 104.0, 1.0, 2.0, [1.0, 1.0], 0.0, [6.0, 3.0],
                unequal)]
    text = "\n".join(bench.schedule_ratio_table(runs, "small", 2))
    assert "| 1.04 | 1.08 | 1.50 | 0.96 | **96%** |" in text


def test_ab_variant_runs_after_its_base_and_is_reported_per_round(bench, capsys):
    args = bench.parse(["--quick", "--dry-run", "--configs", "peer_1f1b", "project_paci",
                        "--ab", "data.prefetch=0"])
    bench.run_all(args, Path("/nonexistent"), [])
    lines = [x for x in capsys.readouterr().out.splitlines() if "pretrain_gpt.py" in x
             or "--worker" in x]
    assert len(lines) == 3 and "--worker" in lines[0]  # the peer gets no variant
    assert "data.prefetch=0" not in lines[1] and lines[2].endswith("data.prefetch=0")
    Run = bench.Run
    runs = [Run("project_paci", "small", 2, k, x, 1.0, 2.0, [1.0, 1.0]) for k, x in
            ((1, 100.0), (2, 200.0))]
    runs += [Run("project_paci+data.prefetch=0", "small", 2, k, x, 1.0, 2.0, [1.0, 1.0])
             for k, x in ((1, 90.0), (2, 220.0))]
    text = "\n".join(bench.ab_table(runs, args, "small", 2))
    assert "| project_paci | 90 / 220 | 0.90 / 1.10 | **1.00** |" in text


def test_side_by_side_reports_each_copy_over_alone_per_round(bench):
    args = bench.parse(["--shapes", "small", "--micro-batches", "4", "--side-by-side",
                        "--configs", "peer_plain", "project_1p"])
    Run = bench.Run
    runs = []
    for name, alone, a, b in (("peer_plain", (100.0, 120.0), (100.0, 120.0), (100.0, 120.0)),
                              ("project_1p", (100.0, 100.0), (80.0, 90.0), (90.0, 100.0))):
        for k in (1, 2):
            runs += [Run(name, "small", 4, k, alone[k - 1], 1.0, 2.0, [1.0]),
                     Run(f"{name}_side1", "small", 4, k, a[k - 1], 1.0, 2.0, [1.0]),
                     Run(f"{name}_side2", "small", 4, k, b[k - 1], 1.0, 2.0, [1.0])]
    text = "\n".join(bench.side_table(runs, args, "small", 4))
    assert "| peer_plain | 100 / 120 | 100+100 / 120+120 | 1.00 / 1.00 | **1.00** |" in text
    assert "| project_1p | 100 / 100 | 80+90 / 90+100 | 0.85 / 0.95 | **0.90** |" in text


def test_arguments(bench):
    a = bench.parse(["--quick"])
    assert (a.rounds, a.iters, a.warmup, a.shapes, a.micro_batches) == \
        (1, 4, 1, ["small"], {"small": [2]})
    a = bench.parse(["--micro-batches", "small:2", "compute:4", "small:4"])
    assert a.micro_batches == {"small": [2, 4], "compute": [4]}
    assert bench.parse([]).micro_batches == {"small": [2, 4], "compute": [4]}


def test_dry_run_lists_every_configuration_once_per_round(bench, capsys):
    assert bench.main(["--dry-run", "--shapes", "small", "--micro-batches", "2",
                       "--rounds", "2"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "_M2_" in x]
    assert len(lines) == 2 * len(bench.CONFIGS)
    for c in bench.CONFIGS:
        mine = [x for x in lines if re.search(rf"_M2_{c.name}_\d+(/| |$)", x)]
        assert len(mine) == 2, c.name
        assert ("torch.distributed.run" in mine[0]) == (c.procs > 1)
        assert ("pretrain_gpt.py" in mine[0]) == (c.side == "project")
