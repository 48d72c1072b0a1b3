"""One checkpoint format across layouts and schedules (gloo, fp32, dropout 0).

1F1B-flush at any layout trains what one process trains, so a checkpoint saved at
iteration 10 in one layout and resumed to 14 in another must give iterations 11-14 of
an uninterrupted one-process run (1e-5 relative): tp2 x pp2 -> 1 process, and
1 process -> tp2, -> dp2 with ZeRO-1, -> pp2. The asynchronous schedules have no such
reference, so their conversions must continue the loss curve without a jump: pp2 PACI
(untied head) -> 1 process, and PipeDream-2BW <-> PACI.

ZeRO-1 state is saved as each rank's own blocks of the global tensors, with no gather:
tp2 x dp2 saved asynchronously (the moments in the checkpoint equal the optimizer state
gathered over dp, an all-gather the save itself never calls) resumes in one process;
dp2 resumes at dp2 with other buckets (the shard boundaries fall elsewhere), saved
synchronously; a tied checkpoint goes into an untied ZeRO-1 head.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

SAVE, END = 10, 14


def cfg_for(prefix, run_dir, **extra):
    return config(prefix, run_dir, END, **{
        "model.num_layers": 4, "optim.lr": 3e-3, "checkpoint.load": True, **extra})


def _phases(rank, world, prefix, tp, pp, phases):
    """Run (run_dir, overrides) phases in order on one set of process groups."""
    from megatron_paci.parallel.state import initialize

    pstate = initialize(tp, pp)
    out = []
    for run_dir, extra in phases:
        trainer = train(cfg_for(prefix, run_dir, **{"parallel.tensor": tp,
                                                    "parallel.pipeline": pp, **extra}), pstate)
        out.append(losses(run_dir) if trainer.log_enabled else None)
    return out


def _logged(results, phase):
    rows = [r[phase] for r in results if r[phase] is not None]
    assert len(rows) == 1
    return np.array(rows[0])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("layouts")))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted one-process run to iteration 14."""
    run = str(tmp_path_factory.mktemp("ref") / "run")
    return np.array(losses(train(cfg_for(dataset, run)).cfg.run.dir))


def _assert_tail_equal(got, reference):
    assert len(got) == END
    rel = np.abs(got[SAVE:] - reference[SAVE:]) / np.abs(reference[SAVE:])
    assert rel.max() < 1e-5, (got[SAVE:], reference[SAVE:])


def test_tp2_pp2_checkpoint_resumes_in_one_process(dataset, reference, tmp_path):
    run = str(tmp_path / "run")
    res = spawn(_phases, 4, args=(dataset, 2, 2, [(run, {"train.exit_interval": SAVE})]),
                timeout=300)
    assert len(_logged(res, 0)) == SAVE
    resumed = train(cfg_for(dataset, run))
    assert resumed.progress.iteration == END
    _assert_tail_equal(np.array(losses(run)), reference)


def test_one_process_checkpoint_resumes_at_tp2_dp2_zero1_and_pp2(dataset, reference,
                                                                  tmp_path):
    saved = str(tmp_path / "saved")
    train(cfg_for(dataset, saved, **{"train.exit_interval": SAVE}))
    assert len(losses(saved)) == SAVE
    for name, tp, pp, extra in (("tp2", 2, 1, {}),
                                ("dp2_zero1", 1, 1, {"optim.distributed_optimizer": True}),
                                ("pp2", 1, 2, {"pipeline.schedule": "1f1b_flush"})):
        run = str(tmp_path / name)
        shutil.copytree(saved, run)
        res = spawn(_phases, 2, args=(dataset, tp, pp, [(run, extra)]), timeout=300)
        _assert_tail_equal(_logged(res, 0), reference)


def test_pp2_paci_untied_checkpoint_in_one_process(dataset, tmp_path):
    run = str(tmp_path / "paci")
    res = spawn(_phases, 2, args=(dataset, 1, 2, [(run, {"pipeline.schedule": "paci",
                                                          "train.exit_interval": SAVE})]),
                timeout=300)
    last_saved = _logged(res, 0)[-1]
    from megatron_paci.checkpoint.format import CheckpointError

    # One process ties by default: the trained head differs from the embedding, so the
    # silent drop of old is now an error naming the two ways out.
    with pytest.raises(CheckpointError, match="model.tie_embeddings=false.*use_embedding"):
        train(cfg_for(dataset, run))
    kept = str(tmp_path / "kept")
    shutil.copytree(run, kept)
    train(cfg_for(dataset, kept, **{"model.tie_embeddings": False}))
    first = losses(kept)[SAVE]
    assert abs(first - last_saved) / last_saved < 0.01, (first, last_saved)
    tied = str(tmp_path / "tied")
    shutil.copytree(run, tied)
    train(cfg_for(dataset, tied, **{"checkpoint.untied_head": "use_embedding"}))
    assert len(losses(tied)) == END


def test_2bw_and_paci_checkpoints_resume_under_each_other(dataset, tmp_path):
    a, b = str(tmp_path / "2bw_to_paci"), str(tmp_path / "paci_to_2bw")
    phases = [(a, {"pipeline.schedule": "pipedream_2bw", "train.exit_interval": SAVE}),
              (a, {"pipeline.schedule": "paci"}),
              (b, {"pipeline.schedule": "paci", "train.exit_interval": SAVE}),
              (b, {"pipeline.schedule": "pipedream_2bw"})]
    res = spawn(_phases, 2, args=(dataset, 1, 2, phases), timeout=300)
    for saved, resumed in ((0, 1), (2, 3)):
        before, after = _logged(res, saved), _logged(res, resumed)
        assert len(before) == SAVE and len(after) == END
        assert (after[:SAVE] == before).all()  # the history is kept, not rewritten
        assert abs(after[SAVE] - before[-1]) / before[-1] < 0.01, (after[SAVE], before[-1])
    assert os.path.isdir(os.path.join(b, "checkpoints"))


def _zero1_run(rank, world, prefix, run_dir, tp, extra):
    from megatron_paci.optim.distributed_optimizer import DistributedOptimizer
    from megatron_paci.parallel.state import initialize

    gathered = DistributedOptimizer.state_by_name
    calls = []

    def counted(self):
        calls.append(1)
        return gathered(self)

    DistributedOptimizer.state_by_name = counted
    pstate = initialize(tp, 1)
    trainer = train(cfg_for(prefix, run_dir, **{"parallel.tensor": tp,
                                                "optim.distributed_optimizer": True, **extra}),
                    pstate)
    save_gathers = len(calls)
    state = {k: v.clone() for k, v in trainer.optimizer.state_by_name().items()}
    dims = {n: getattr(p, "tensor_parallel_dim", None)
            for n, p in trainer.model.named_parameters()}
    return {"gathers_in_run": save_gathers, "state": state, "dims": dims,
            "tp_rank": pstate.tensor_rank,
            "losses": losses(run_dir) if trainer.log_enabled else None}


def _saved_optimizer(path):
    """Every optimizer tensor of a checkpoint, whole, read in this one process."""
    from megatron_paci.checkpoint.format import load_checkpoint
    from megatron_paci.checkpoint.parts import saved_tensor_keys

    tree = {"optimizer": {k.split(".", 1)[1]: torch.zeros(s)
                          for k, s in saved_tensor_keys(path).items()
                          if k.startswith("optimizer.")}}
    load_checkpoint(path, tree)
    return tree["optimizer"]


def test_tp2_dp2_zero1_async_save_has_no_gather_and_resumes_in_one_process(
        dataset, reference, tmp_path):
    run = str(tmp_path / "run")
    res = spawn(_zero1_run, 4, args=(dataset, run, 2, {"train.exit_interval": SAVE,
                                                       "checkpoint.interval": 5,
                                                       "checkpoint.async_save": True}),
                timeout=300)
    assert [r["gathers_in_run"] for r in res] == [0] * 4  # two saves, no gather
    saved = _saved_optimizer(f"{run}/checkpoints/iter_{SAVE:07d}")
    compared = 0
    for r in res:
        for key, t in r["state"].items():
            t = torch.as_tensor(t)
            full = saved[key]
            dim = r["dims"][key.rsplit(".", 1)[0]] if t.ndim else None
            want = full.chunk(2, dim)[r["tp_rank"]] if dim is not None else full
            assert torch.equal(want, t), key
            compared += 1
    assert compared == 4 * len(res[0]["state"])
    train(cfg_for(dataset, run))
    _assert_tail_equal(np.array(losses(run)), reference)


def test_dp2_zero1_checkpoint_resumes_with_other_shard_boundaries(dataset, reference,
                                                                   tmp_path):
    saved = str(tmp_path / "saved")
    spawn(_zero1_run, 2, args=(dataset, saved, 1, {"train.exit_interval": SAVE}), timeout=300)
    run = str(tmp_path / "moved")
    shutil.copytree(saved, run)
    res = spawn(_zero1_run, 2, args=(dataset, run, 1, {"optim.grad_bucket_mb": 0.0037}),
                timeout=300)
    _assert_tail_equal(np.array(next(r["losses"] for r in res if r["losses"] is not None)),
                       reference)


def test_tied_checkpoint_into_an_untied_zero1_head(dataset, tmp_path):
    """The head and its moments start as copies of the embedding's. A ZeRO-1 rank's
    slices of the head lie elsewhere in the tensor than its slices of the embedding, so
    it reads them from the checkpoint; one process copies whole tensors instead."""
    saved = str(tmp_path / "saved")
    train(cfg_for(dataset, saved, **{"train.exit_interval": SAVE}))
    one, zero = str(tmp_path / "one"), str(tmp_path / "zero")
    shutil.copytree(saved, one)
    shutil.copytree(saved, zero)
    train(cfg_for(dataset, one, **{"model.tie_embeddings": False}))
    res = spawn(_zero1_run, 2, args=(dataset, zero, 1, {"model.tie_embeddings": False}),
                timeout=300)
    got = np.array(next(r["losses"] for r in res if r["losses"] is not None))
    _assert_tail_equal(got, np.array(losses(one)))
