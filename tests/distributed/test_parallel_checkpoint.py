"""Checkpoints under tensor parallelism: exact resume at tp=2, and a tp=2
checkpoint loaded by one process (DCP reshards the DTensor shards)."""

import os
import shutil

import numpy as np
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train


def _tp2_runs(rank, world, prefix, root):
    from megatron_paci.parallel.state import initialize

    tp = {"parallel.tensor": 2, "optim.distributed_optimizer": False}
    straight = config(prefix, os.path.join(root, "straight"), 8, **tp)
    pstate = initialize(2, 1)
    train(straight, pstate)
    resumed = config(prefix, os.path.join(root, "resumed"), 8, **tp, **{
        "train.exit_interval": 4, "checkpoint.load": True})
    train(resumed, pstate)  # stops (and saves) at iteration 4
    if rank == 0:
        shutil.copytree(resumed.run.dir, os.path.join(root, "at4"))
    train(resumed, pstate)  # relaunch: resumes at 4, runs to 8

    # ZeRO-1 over dp=2: optimizer state is gathered to full tensors on save and
    # re-sharded on load, so the resume is exact too.
    zero = {"optim.distributed_optimizer": True}
    pstate = initialize(1, 1)
    train(config(prefix, os.path.join(root, "zero_straight"), 6, **zero), pstate)
    zero_resumed = config(prefix, os.path.join(root, "zero_resumed"), 6, **zero, **{
        "train.exit_interval": 3, "checkpoint.load": True})
    train(zero_resumed, pstate)
    train(zero_resumed, pstate)
    return None


def test_tp2_resume_exact_and_one_process_loads_tp2_checkpoint(tmp_path):
    prefix = make_dataset(str(tmp_path))
    root = str(tmp_path / "runs")
    spawn(_tp2_runs, 2, args=(prefix, root), timeout=180)
    straight = losses(os.path.join(root, "straight"))
    resumed = losses(os.path.join(root, "resumed"))
    assert len(straight) == 8 and resumed == straight  # bit-exact

    zero_straight = losses(os.path.join(root, "zero_straight"))
    assert len(zero_straight) == 6
    assert losses(os.path.join(root, "zero_resumed")) == zero_straight

    # One process, tp=1, picks up the tp=2 checkpoint at iteration 4.
    one = config(prefix, os.path.join(root, "at4"), 8, **{"checkpoint.load": True})
    trainer = train(one)
    assert trainer.progress.iteration == 8
    got = np.array(losses(one.run.dir))  # rows 1-4 from tp=2, 5-8 from one process
    rel = np.abs(got - np.array(straight)) / np.array(straight)
    assert len(got) == 8 and rel.max() < 1e-5, rel
