"""Drains, checkpoints and failures of a 2-stage pipeline.

- A run stopped at a drain (train.exit_interval) and relaunched continues with
  the same version rule: its losses equal a run that drained (checkpointed) at
  the same iteration without stopping, bit for bit, for every schedule.
- The checkpoint of a 2-stage run loads into one process for generation, and a
  PACI checkpoint resumes as PipeDream-2BW.
- A stage that dies makes the other exit with an error naming the stage and
  the action it was waiting on.
"""

import os
import shutil
import time

import numpy as np
import torch
from launcher import spawn
from parallel_equality import losses, make_dataset, train
from test_pipeline_training import SCHEDULES, pipeline_config


def _resume_runs(rank, world, prefix, root):
    from megatron_paci.parallel.state import initialize

    pstate = initialize(1, 2)
    params = {}
    for schedule in SCHEDULES:
        common = {"train.iters": 6, "checkpoint.interval": 3, "checkpoint.load": True,
                  "pipeline.verify_versions": False}
        straight = pipeline_config(prefix, os.path.join(root, schedule, "straight"), schedule,
                                   2, **common)
        train(straight, pstate)
        resumed = pipeline_config(prefix, os.path.join(root, schedule, "resumed"), schedule,
                                  2, **common, **{"train.exit_interval": 3})
        train(resumed, pstate)  # stops after saving at 3
        trainer = train(resumed, pstate)  # relaunch: resumes at 3
        params[schedule] = {n: p.detach().numpy().copy()
                            for n, p in trainer.model.named_parameters()}
    # A run can change schedule across a resume: PACI's checkpoint continues as 2BW.
    if rank == 0:
        shutil.copytree(os.path.join(root, "paci", "straight"), os.path.join(root, "switch"))
    torch.distributed.barrier()
    switched = pipeline_config(prefix, os.path.join(root, "switch"),
                               "pipedream_2bw", 2, **{"train.iters": 9,
                                                      "checkpoint.load": True,
                                                      "pipeline.verify_versions": False})
    train(switched, pstate)
    return params


def test_resume_at_a_drain_is_exact_and_checkpoint_loads_in_one_process(tmp_path):
    from megatron_paci.training.generate import load_for_generation

    prefix = make_dataset(str(tmp_path))
    root = str(tmp_path / "runs")
    stage_params = spawn(_resume_runs, 2, args=(prefix, root), timeout=300)
    for schedule in SCHEDULES:
        a = losses(os.path.join(root, schedule, "straight"))
        b = losses(os.path.join(root, schedule, "resumed"))
        assert len(a) == 6 and a == b, (schedule, a, b)
        # One process picks up the 2-stage checkpoint with every stage's weights.
        model, _, _ = load_for_generation(os.path.join(root, schedule, "resumed"))
        whole = dict(model.named_parameters())
        for stage in stage_params:
            for name, value in stage[schedule].items():
                if name in whole:
                    np.testing.assert_array_equal(whole[name].detach().numpy(), value)
        assert ("output_layer.weight" in whole) == (schedule != "1f1b_flush")
    switched = losses(os.path.join(root, "switch"))
    assert len(switched) == 9 and switched[:6] == losses(os.path.join(root, "paci", "resumed"))


def _stage_dies(rank, world, prefix, run_dir):
    from megatron_paci.parallel.state import initialize
    from megatron_paci.pipeline.executor import PipelineError

    cfg = pipeline_config(prefix, run_dir, "paci", 2, **{"parallel.timeout_s": 20})
    from megatron_paci.training.trainer import Trainer

    trainer = Trainer(cfg, initialize(1, 2, timeout_s=20))
    forward = trainer.executor._forward
    calls = {"n": 0}

    def dying_forward(action, *args):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 5:
            os._exit(13)
        return forward(action, *args)

    trainer.executor._forward = dying_forward
    start = time.monotonic()
    try:
        trainer.train()
    except PipelineError as e:
        return {"message": str(e), "seconds": time.monotonic() - start}
    return {"message": None}


def test_dead_stage_named_by_the_survivor(tmp_path):
    prefix = make_dataset(str(tmp_path))
    res = spawn(_stage_dies, 2, args=(prefix, str(tmp_path / "run")), timeout=90,
                allow_failures=True, pg_timeout=20)
    assert "exit code 13" in res[1]
    msg = res[0]["message"]
    assert msg and msg.startswith("stage 0 (rank 0) was running B") and "from stage 1" in msg
    assert res[0]["seconds"] < 30
