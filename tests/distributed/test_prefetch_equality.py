"""Reading micro-batches ahead on a background thread changes nothing a run computes: a
2-stage PACI run (both stages read data: tokens on the first, labels on the last) gives
bit-identical losses with ``data.prefetch=0`` and ``data.prefetch=3``, and a resume
from a checkpoint written with read-ahead in flight continues exactly."""

import os

from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

PIPE = {"parallel.pipeline": 2, "pipeline.schedule": "paci", "train.global_batch_size": 8,
        "optim.distributed_optimizer": False}


def _runs(rank, world, prefix, root):
    from megatron_paci.parallel.state import initialize

    pstate = initialize(1, 2)
    # Both drain at 3 (the checkpoint interval): a PACI drain changes what is in flight.
    train(config(prefix, os.path.join(root, "off"), 6, **PIPE,
                 **{"data.prefetch": 0, "checkpoint.interval": 3}), pstate)
    on = config(prefix, os.path.join(root, "on"), 6, **PIPE,
                **{"data.prefetch": 3, "checkpoint.interval": 3, "checkpoint.load": True,
                   "train.exit_interval": 3})
    train(on, pstate)  # stops at 3 with 3 micro-batches read ahead and dropped
    train(on, pstate)  # resumes at 3
    return rank


def test_prefetch_changes_no_loss_and_resumes_exactly(tmp_path):
    prefix = make_dataset(str(tmp_path))
    root = str(tmp_path / "runs")
    assert spawn(_runs, 2, args=(prefix, root), timeout=240) == [0, 1]
    off, on = losses(os.path.join(root, "off")), losses(os.path.join(root, "on"))
    assert len(off) == 6 and on == off
