"""PACI and PipeDream-2BW with virtual stages: each model chunk steps after its own window.

Checked against the sequential emulator, whose version tables for several chunks are
written from Megatron's interleaved index maps (pipeline/emulator.py), not from the
action lists or the policies: losses of 10 windows within 1e-5 relative in fp32, and
every (chunk, micro-batch)'s versions as the run measured them. P=2, v=2 (4 layers, one
per virtual stage), window a=4; then P=2 x dp=2 with ZeRO-1, where each chunk reduces
and shards its own gradients. A checkpoint of the interleaved PACI run resumes in one
process without interleaving (layer names are global).
"""

import os

import numpy as np
import pytest
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train
from pipeline_oracle import emulated_losses

from megatron_paci.pipeline.emulator import interleaved_paci_versions, two_bw_versions

WINDOWS = 10
WINDOW = 4  # global batch 8, micro-batch 2, dp 1
SCHEDULES = ("paci", "pipedream_2bw")
# docs/schedules/virtual_stages.md: at P=2, v=2 the most earlier micro-batches of chunk c
# in flight at a forward n_{s,c} are, rank 0: 3, 1; rank 1: 2, 0, so a micro-batch
# crosses at most ceil(n / a) = 1 update of its chunk (a = 4). Since windows start at a
# group of P micro-batches, the second chunks never cross one: the drift measured is
EARLIER_IN_FLIGHT = {(0, 0): 3, (0, 1): 1, (1, 0): 2, (1, 1): 0}
PACI_DRIFT = {(0, 0): 1, (0, 1): 0, (1, 0): 1, (1, 1): 0}


def cfg_for(prefix, run_dir, schedule, **extra):
    dp = extra.pop("dp", 1)
    return config(prefix, run_dir, WINDOWS, **{
        "model.num_layers": 4, "parallel.pipeline": 2, "parallel.virtual_pipeline": 2,
        "pipeline.schedule": schedule, "train.global_batch_size": 8 * dp, "optim.lr": 3e-3,
        "pipeline.verify_versions": True, **extra})


def _run(rank, world, prefix, root, schedules, extra):
    from megatron_paci.parallel.state import initialize

    pstate = initialize(1, 2)
    out = {}
    for schedule in schedules:
        cfg = cfg_for(prefix, os.path.join(root, schedule), schedule, **extra)
        trainer = train(cfg, pstate)
        tel = trainer.executor.telemetry
        out[schedule] = {"losses": losses(cfg.run.dir) if trainer.log_enabled else None,
                         "stage": pstate.pipeline_rank, "versions": tel.versions,
                         "peak_versions": tel.peak_versions, "checksums": tel.checksums,
                         "optimizers": len(trainer.optimizer.optimizers)}
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("interleaved_async")))


def _logged(results, schedule):
    rows = [r[schedule]["losses"] for r in results if r[schedule]["losses"] is not None]
    assert len(rows) == 1
    return np.array(rows[0])


def _emulated(dataset, tmp_path, schedule, dp=1, segments=None, **extra):
    cfg = cfg_for(dataset, str(tmp_path / f"emu_{schedule}"), schedule,
                  **({"dp": dp} if dp > 1 else {}), **extra)
    return np.array(emulated_losses(cfg, 2, dp, WINDOWS, segments))


def _want_versions(schedule, stage, chunk, segments):
    out, first = {}, 1
    for n in segments:
        if schedule == "paci":
            out.update(interleaved_paci_versions(2, stage, WINDOW, n, first, 2, chunk))
        else:
            out.update(two_bw_versions(2, stage, WINDOW, n, first))
        first += n
    return out


def test_interleaved_paci_and_2bw_match_emulator_then_resume_without_interleaving(
        dataset, tmp_path):
    extra = {"checkpoint.interval": 5}  # a drain (and a fresh warm-up) after window 5
    res = spawn(_run, 2, args=(dataset, str(tmp_path), SCHEDULES, extra), timeout=400)
    for schedule in SCHEDULES:
        got = _logged(res, schedule)
        want = _emulated(dataset, tmp_path, schedule, segments=[5, 5], **extra)
        assert len(got) == WINDOWS
        assert np.abs(got - want).max() / np.abs(want).min() < 1e-5, (schedule, got, want)
        for r in res:
            s = r[schedule]["stage"]
            assert r[schedule]["optimizers"] == 2  # one per chunk
            for c in range(2):
                seen = {j: tuple(v) for (chunk, j), v in r[schedule]["versions"].items()
                        if chunk == c}
                assert seen == _want_versions(schedule, s, c, [5, 5]), (schedule, s, c)
                drift = max(vb - vf for vf, vb in seen.values())
                assert drift == (PACI_DRIFT[s, c] if schedule == "paci" else 0)
                assert drift <= -(-EARLIER_IN_FLIGHT[s, c] // WINDOW)
        if schedule == "pipedream_2bw":
            assert all(r[schedule]["peak_versions"] == 2 for r in res)
            # Each F(j, c) and its B(j, c) saw bit-identical weights of their chunk.
            assert all(a == b for r in res for a, b in r[schedule]["checksums"].values())

    # The PACI checkpoint at iteration 5 (virtual stages u = c*P + s), resumed in one
    # process: every layer, the untied head and the chunks' Adam states load by name,
    # and the loss curve continues (no jump: within 1% of the run's own iteration 6).
    paci = _logged(res, "paci")
    one = train(config(dataset, str(tmp_path / "paci"), WINDOWS, **{
        "model.num_layers": 4, "pipeline.schedule": "paci", "model.tie_embeddings": False,
        "optim.lr": 3e-3, "checkpoint.load": True}))
    assert one.progress.iteration == WINDOWS
    resumed = np.array(losses(one.cfg.run.dir))
    assert len(resumed) == WINDOWS  # iterations 1-5 kept from the run, 6-10 appended
    assert abs(resumed[5] - paci[5]) / paci[5] < 0.01, (resumed[5], paci[5])


def test_interleaved_paci_with_dp2_and_zero1_matches_emulator(dataset, tmp_path):
    """Each chunk reduce-scatters and steps its own gradients over dp, on its own."""
    extra = {"dp": 2, "optim.distributed_optimizer": True}
    res = spawn(_run, 4, args=(dataset, str(tmp_path), ("paci",), extra), timeout=400)
    got = _logged(res, "paci")
    want = _emulated(dataset, tmp_path, "paci", dp=2, **{"optim.distributed_optimizer": True})
    assert np.abs(got - want).max() / np.abs(want).min() < 1e-5, (got, want)
