"""model.recompute=full on 2 pipeline ranks, each schedule against what it must equal.

1F1B-flush and PipeDream-2BW: the losses of recompute=none (2BW's backward runs on the
stashed version its forward used, recomputed or not). PACI: its backward recomputes on
the live weights, so the losses equal recompute=none's exactly as long as no update
crossed: with P=2 and a window of a=4, stage 0's B(5) is the first to cross (v_F=0,
v_B=1) and feeds update 2, whose weights stage 0's F(10) uses, so iterations 1-2 agree
and iteration 3 differs.
"""

import contextlib
import io
import os

import numpy as np
import pytest
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

SCHEDULES = ("1f1b_flush", "pipedream_2bw", "paci")
ITERS = 3


def _run(rank, world, prefix, root):
    from megatron_paci.parallel.state import initialize

    pstate = initialize(1, 2)
    out = {}
    for schedule in SCHEDULES:
        for recompute in ("none", "full"):
            cfg = config(prefix, os.path.join(root, f"{schedule}_{recompute}"), ITERS, **{
                "model.num_layers": 4, "parallel.pipeline": 2, "pipeline.schedule": schedule,
                "model.recompute": recompute, "pipeline.layers_per_stage": "auto",
                "optim.lr": 3e-2, "pipeline.verify_versions": True})
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                trainer = train(cfg, pstate)
            out[(schedule, recompute)] = {
                "losses": losses(cfg.run.dir) if trainer.log_enabled else None,
                "versions": trainer.executor.telemetry.versions,
                "log": log.getvalue(),
            }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("recompute")
    return spawn(_run, 2, args=(make_dataset(str(root)), str(root)), timeout=300)


def _losses(results, key):
    (got,) = [r[key]["losses"] for r in results if r[key]["losses"] is not None]
    assert len(got) == ITERS
    return np.array(got)


@pytest.mark.parametrize("schedule", ["1f1b_flush", "pipedream_2bw"])
def test_flush_and_2bw_with_recompute_equal_their_runs_without(results, schedule):
    want = _losses(results, (schedule, "none"))
    got = _losses(results, (schedule, "full"))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_paci_with_recompute_departs_exactly_after_the_first_crossed_update(results):
    stage0 = results[0][("paci", "full")]["versions"]
    assert stage0[(0, 5)] == [0, 1]  # B(5) on stage 0 crosses update 1
    assert all(vf == vb for (_, j), (vf, vb) in stage0.items() if j < 5)
    want = _losses(results, ("paci", "none"))
    got = _losses(results, ("paci", "full"))
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6, atol=0)
    assert abs(got[2] - want[2]) > 1e-6 * abs(want[2]), (got, want)


def test_start_up_log_shows_the_auto_split_and_its_cost(results):
    log = next(r[("paci", "full")]["log"] for r in results if r[("paci", "full")]["log"])
    line = next(x for x in log.splitlines() if x.startswith("pipeline: PACI, 2 stages"))
    assert "split (pipeline.layers_per_stage=auto: balanced by FLOPs" in line
    assert "[2, 2] layers, cost / mean" in line and "max/mean" in line
