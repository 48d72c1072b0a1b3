"""ZeRO-1 optimizer state saved as each rank's own blocks of the global tensors, with no
gather (gloo, fp32, 1F1B-flush, which at any layout trains what one process trains).

- tp2 x dp2 with ZeRO-1, saved asynchronously: the moments in the checkpoint equal the
  optimizer's state gathered over dp (an all-gather the save itself never calls), and
  one process resumes to iterations 11-14 of an uninterrupted run (1e-5 relative).
- dp2 ZeRO-1 saved, then resumed at dp2 ZeRO-1 with other buckets (so the shard
  boundaries fall elsewhere in the parameters), saved synchronously: the same tail.
"""

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


def _run(rank, world, prefix, run_dir, tp, extra):
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


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("zero1")))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref") / "run")
    return np.array(losses(train(cfg_for(dataset, run)).cfg.run.dir))


def _tail_equal(got, reference):
    got = np.array(got)
    assert len(got) == END
    rel = np.abs(got[SAVE:] - reference[SAVE:]) / np.abs(reference[SAVE:])
    assert rel.max() < 1e-5, (got[SAVE:], reference[SAVE:])


def _saved_tensors(path):
    import torch.distributed.checkpoint as dcp

    from megatron_paci.checkpoint.format import _TensorOnlyLoadPlanner
    from megatron_paci.checkpoint.parts import saved_tensor_keys

    keys = {k: s for k, s in saved_tensor_keys(path).items() if k.startswith("optimizer.")}
    tree = {k: torch.zeros(s) for k, s in keys.items()}
    dcp.load(tree, checkpoint_id=path, planner=_TensorOnlyLoadPlanner(), no_dist=True)
    return tree


def test_tp2_dp2_zero1_async_save_has_no_gather_and_resumes_in_one_process(
        dataset, reference, tmp_path):
    run = str(tmp_path / "run")
    res = spawn(_run, 4, args=(dataset, run, 2, {"train.exit_interval": SAVE,
                                                 "checkpoint.interval": 5,
                                                 "checkpoint.async_save": True}),
                timeout=300)
    assert [r["gathers_in_run"] for r in res] == [0] * 4  # two saves, no gather
    saved = _saved_tensors(f"{run}/checkpoints/iter_{SAVE:07d}")
    compared = 0
    for r in res:
        for key, t in r["state"].items():
            t = torch.as_tensor(t)
            full = saved[f"optimizer.{key}"]
            dim = r["dims"][key.rsplit(".", 1)[0]] if t.ndim else None
            want = full.chunk(2, dim)[r["tp_rank"]] if dim is not None else full
            assert torch.equal(want, t), key
            compared += 1
    assert compared == 4 * len(res[0]["state"])
    train(cfg_for(dataset, run))
    _tail_equal(losses(run), reference)


def test_dp2_zero1_checkpoint_resumes_with_other_shard_boundaries(dataset, reference,
                                                                   tmp_path):
    saved = str(tmp_path / "saved")
    spawn(_run, 2, args=(dataset, saved, 1, {"train.exit_interval": SAVE}), timeout=300)
    run = str(tmp_path / "moved")
    shutil.copytree(saved, run)
    res = spawn(_run, 2, args=(dataset, run, 1, {"optim.grad_bucket_mb": 0.0037}),
                timeout=300)
    _tail_equal(next(r["losses"] for r in res if r["losses"] is not None), reference)


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
    res = spawn(_run, 2, args=(dataset, zero, 1, {"model.tie_embeddings": False}),
                timeout=300)
    got = np.array(next(r["losses"] for r in res if r["losses"] is not None))
    want = np.array(losses(one))
    assert len(got) == len(want) == END
    rel = np.abs(got[SAVE:] - want[SAVE:]) / want[SAVE:]
    assert rel.max() < 1e-5, (got[SAVE:], want[SAVE:])
