"""Pipeline runs on gloo equal the sequential emulator of their schedule.

P=2 and P=4, and P=2 with tp=2 or dp=2: the losses of 10 windows agree with
the emulator to 1e-5 relative in fp32, for 1F1B-flush, PipeDream-2BW and
PACI; 1F1B-flush also equals plain one-process training. Every run's point-to-point
calls, replayed under NCCL's blocking rules (pipeline/nccl_model.py), complete.
"""

import os

import numpy as np
import pytest
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train
from pipeline_oracle import emulated_losses

from megatron_paci.pipeline.nccl_model import stuck_calls

SCHEDULES = ("1f1b_flush", "pipedream_2bw", "paci")
WINDOWS = 10


def pipeline_config(prefix, run_dir, schedule, stages, **extra):
    dp = extra.pop("dp", 1)
    return config(prefix, run_dir, WINDOWS, **{
        "model.num_layers": 4, "pipeline.schedule": schedule, "parallel.pipeline": stages,
        "train.global_batch_size": 8 * dp, "optim.lr": 3e-3,
        "pipeline.verify_versions": True, **extra})


def _run(rank, world, prefix, root, stages, tp, extra, schedules=SCHEDULES):
    from megatron_paci.parallel import comm
    from megatron_paci.parallel.state import initialize

    out = {}
    pstate = initialize(tp, stages)
    for schedule in schedules:
        cfg = pipeline_config(prefix, os.path.join(root, schedule), schedule, stages,
                              **{"parallel.tensor": tp, **extra})
        comm.P2P_CALLS = []
        trainer = train(cfg, pstate)
        calls, comm.P2P_CALLS = comm.P2P_CALLS, None
        tel = trainer.executor.telemetry
        out[schedule] = {
            "losses": losses(cfg.run.dir) if trainer.log_enabled else None,
            "stage": pstate.pipeline_rank,
            "versions": tel.versions, "peak_in_flight": tel.peak_in_flight,
            "peak_versions": tel.peak_versions, "checksums": tel.checksums,
            "p2p": calls, "peak_unfinished_sends": tel.peak_unfinished_sends,
            "max_drift": tel.max_drift(),
        }
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("pp")))


def _check(results, dataset, tmp_path, stages, dp=1, schedules=SCHEDULES, segments=None,
           windows=WINDOWS, **extra):
    logging = [r for r in results if r[schedules[0]]["losses"] is not None]
    assert len(logging) == 1
    errors = {}
    for schedule in schedules:
        got = np.array(logging[0][schedule]["losses"])
        cfg = pipeline_config(dataset, str(tmp_path / f"emu_{schedule}"), schedule, stages,
                              **({"dp": dp} if dp > 1 else {}), **extra)
        want = np.array(emulated_losses(cfg, stages, dp, windows, segments))
        assert len(got) == windows
        errors[schedule] = float((np.abs(got - want) / np.abs(want)).max())
    assert max(errors.values()) < 1e-5, errors
    for schedule in schedules:
        calls = {rank: r[schedule]["p2p"] for rank, r in enumerate(results)}
        assert sum(map(len, calls.values())) > 0
        assert stuck_calls(calls) is None, (schedule, stuck_calls(calls))
    window = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    for schedule in schedules:
        for r in results:
            res = r[schedule]
            s = res["stage"]
            assert res["peak_in_flight"] <= stages - s
            # Sent tensors are let go as their sends complete, not held to the drain.
            assert res["peak_unfinished_sends"] <= 2 * stages, res["peak_unfinished_sends"]
            drift = max(vb - vf for vf, vb in res["versions"].values())
            assert res["max_drift"] == drift  # the running maximum the log reports
            if schedule == "paci":
                bound = -(-(stages - s - 1) // window)  # ceil((P-s-1)/a)
                assert drift == bound, (s, drift, bound)
            else:
                assert drift == 0
            if schedule == "pipedream_2bw":
                assert res["peak_versions"] == 2
                # F(j) and B(j) saw bit-identical weights.
                assert all(a == b for a, b in res["checksums"].values())


def test_two_stages_match_emulator_and_flush_matches_one_process(dataset, tmp_path):
    res = spawn(_run, 2, args=(dataset, str(tmp_path), 2, 1, {}), timeout=300)
    _check(res, dataset, tmp_path, 2)
    # 1F1B-flush on 2 stages is plain training: compare with one process, P=1.
    one = train(pipeline_config(dataset, str(tmp_path / "one"), "1f1b_flush", 1))
    flush = [r for r in res if r["1f1b_flush"]["losses"] is not None][0]["1f1b_flush"]
    rel = np.abs(np.array(flush["losses"]) - np.array(losses(one.cfg.run.dir)))
    assert rel.max() / min(losses(one.cfg.run.dir)) < 1e-5


def test_four_stages_match_emulator(dataset, tmp_path):
    res = spawn(_run, 4, args=(dataset, str(tmp_path), 4, 1, {}), timeout=300)
    _check(res, dataset, tmp_path, 4)


def test_two_stages_with_tp2_match_emulator(dataset, tmp_path):
    res = spawn(_run, 4, args=(dataset, str(tmp_path), 2, 2, {}), timeout=300)
    _check(res, dataset, tmp_path, 2)


def test_two_stages_with_dp2_match_emulator(dataset, tmp_path):
    res = spawn(_run, 4, args=(dataset, str(tmp_path), 2, 1, {"dp": 2}), timeout=300)
    _check(res, dataset, tmp_path, 2, dp=2)


def test_four_stages_fewer_microbatches_than_stages(dataset, tmp_path):
    """M=2 < P=4: flush drains within the window, PACI crosses up to ceil(3/2)=2 updates."""
    extra = {"train.global_batch_size": 4}
    schedules = ("1f1b_flush", "paci")
    res = spawn(_run, 4, args=(dataset, str(tmp_path), 4, 1, extra, schedules), timeout=300)
    _check(res, dataset, tmp_path, 4, schedules=schedules, **extra)


def test_paci_with_dp2_and_zero1_matches_emulator(dataset, tmp_path):
    """PACI steps each stage on its own; ZeRO-1 shards that step over the stage's dp group."""
    zero = {"optim.distributed_optimizer": True}
    res = spawn(_run, 4, args=(dataset, str(tmp_path), 2, 1, {"dp": 2, **zero}, ("paci",)),
                timeout=300)
    _check(res, dataset, tmp_path, 2, dp=2, schedules=("paci",), **zero)


def test_drains_for_evaluation_keep_each_schedules_rule(dataset, tmp_path):
    """Evaluation every 3 windows drains the pipeline (segments 3, 3, 3, 1): the run still
    equals the emulator run over the same segments, for every schedule."""
    extra = {"train.eval_interval": 3, "train.eval_iters": 1}
    res = spawn(_run, 2, args=(dataset, str(tmp_path), 2, 1, extra), timeout=300)
    _check(res, dataset, tmp_path, 2, segments=[3, 3, 3, 1], **extra)


def test_tp2_dp2_pp2_all_together(dataset, tmp_path):
    """8 processes: tensor, data and pipeline parallelism at once, every schedule, against
    the emulator (fewer windows: this is the deadlock and composition check)."""
    res = spawn(_run, 8, args=(dataset, str(tmp_path), 2, 2, {"dp": 2, "train.iters": 3}),
                timeout=400)
    _check(res, dataset, tmp_path, 2, dp=2, windows=3, **{"train.iters": 3})
