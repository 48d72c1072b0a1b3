"""Training reads no tensor back to the host per micro-batch.

On a GPU every tensor -> Python scalar read (``.item()``, ``float(t)``, ``bool(t)``)
waits for the device to finish, so the host cannot queue the next micro-batch's
kernels while the current one runs. The count is taken here on the CPU, where the
same reads go through the same ATen op (``_local_scalar_dense``): it must not grow
with the number of micro-batches per iteration.
"""

import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "distributed"))
from parallel_equality import config, losses, make_dataset  # noqa: E402


class ScalarReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _not_counted(reads: ScalarReads, fn):
    """torch's AdamW reads its step counters, which live on the CPU unless the fused
    (CUDA) AdamW keeps them on the device: host reads on the CPU, not syncs."""
    def wrapped(*args, **kwargs):
        reads.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            reads.paused = False
    return wrapped


def _reads(tmp_path, name: str, micro_batches: int, iters: int = 3) -> tuple[int, list]:
    from megatron_paci.training.trainer import Trainer

    run_dir = str(tmp_path / name)
    cfg = config(make_dataset(str(tmp_path)), run_dir, iters,
                 **{"train.global_batch_size": 2 * micro_batches, "train.eval_interval": 0})
    trainer = Trainer(cfg)
    reads = ScalarReads()
    trainer.optimizer.adamw.step = _not_counted(reads, trainer.optimizer.adamw.step)
    with reads:
        trainer.train()
    return reads.count, losses(run_dir)


def test_scalar_reads_do_not_grow_with_micro_batches(tmp_path):
    few, few_losses = _reads(tmp_path, "two", micro_batches=2)
    many, many_losses = _reads(tmp_path, "eight", micro_batches=8)
    assert len(few_losses) == len(many_losses) == 3  # both logged every iteration
    assert many == few, (f"{few} scalar reads with 2 micro-batches per iteration, {many} "
                         "with 8: something reads a tensor per micro-batch")
    # Per iteration: the grad norm (clipping) and the logged loss; once: the data loader.
    assert few <= 2 * 3 + 1, f"{few} scalar reads in 3 iterations"
