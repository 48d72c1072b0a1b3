"""scripts/bench_peer.py stays runnable and fair: the peer model has the project's shape
(parameter count, whole and per stage), the plain peer loop trains, the commands give both
sides the same work per step, and the report's ratios are medians of per-round ratios.

Its real runs take minutes on an idle machine (docs/benchmarks.md); one P=2
torch.distributed.pipelining run of 3 iterations keeps that path from rotting.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
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
    losses = bench.plain_loop(s, 2, 6, clip=False)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # Random tokens below 2047: the loss starts near ln(2048) and drops as the model
    # learns the unigram distribution.
    assert abs(losses[0] - torch.log(torch.tensor(2048.0)).item()) < 0.3
    assert losses[-1] < losses[0]


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


def test_arguments(bench):
    a = bench.parse(["--quick"])
    assert (a.rounds, a.iters, a.warmup, a.shapes, a.micro_batches) == \
        (1, 4, 1, ["small"], {"small": [2]})
    a = bench.parse(["--micro-batches", "small:2", "compute:4", "small:4"])
    assert a.micro_batches == {"small": [2, 4], "compute": [4]}
    assert bench.parse([]).micro_batches == {"small": [2, 4], "compute": [4]}


def test_pipelining_peer_runs_on_two_gloo_processes(bench, tmp_path):
    """Schedule1F1B through torchrun, as the benchmark launches it: every iteration's line
    on the last rank, a result file per rank."""
    s = bench.SHAPES["small"]
    c = bench.BY_NAME["peer_1f1b"]
    cmd = bench.command(c, s, 2, 3, "DATA", tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=SCRIPTS.parent, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [x for x in proc.stdout.splitlines() if bench.ITERATION_LINE.match(x)]
    assert [int(bench.ITERATION_LINE.match(x).group(1)) for x in lines] == [1, 2, 3]
    for r in range(2):
        res = json.loads((tmp_path / f"peer.rank{r}.json").read_text())
        assert res["rank"] == r and res["peak_rss_mb"] > 50 and res["first_iter_unix"] > 0
