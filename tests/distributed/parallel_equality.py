"""Shared pieces for the 'parallel training equals one process' tests."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from megatron_paci.config import load_config
from megatron_paci.data.indexed_dataset import IndexedDatasetBuilder

VOCAB = 200  # pads to 256 for tp = 1 and tp = 2 (make_vocab_size_divisible_by = 64)


def make_dataset(directory: str) -> str:
    """Random token documents; equality tests need no real text."""
    prefix = os.path.join(directory, "synthetic")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(64):
        builder.add_document(rng.integers(0, VOCAB - 1, size=int(rng.integers(20, 90))))
    builder.finalize(prefix + ".idx")
    return prefix


def config(prefix: str, run_dir: str, iters: int, **overrides):
    base = {
        "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4,
        "model.seq_length": 16, "model.dropout": 0.0, "model.attention_dropout": 0.0,
        "model.make_vocab_size_divisible_by": 64, "data.path": f"[{prefix}]",
        "data.tokenizer": f"null:{VOCAB}", "train.micro_batch_size": 2,
        "train.global_batch_size": 8, "train.iters": iters, "train.eval_interval": 0,
        "train.precision": "fp32", "train.device": "cpu", "optim.lr": 1e-2,
        "optim.lr_warmup_iters": 2, "optim.clip_grad": 1.0, "optim.grad_bucket_mb": 0.01,
        "logging.interval": 1,
        "logging.plot": False, "checkpoint.save_at_end": False, "checkpoint.load": False,
        "run.dir": run_dir,
    }
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def full_grads(trainer) -> dict[str, np.ndarray]:
    """Every parameter's gradient, reassembled over dp shards and tp shards."""
    from megatron_paci.parallel import comm

    opt, ps = trainer.optimizer, trainer.pstate
    buf = opt.grad_buffer
    data = buf.buffer
    if opt.distributed is not None and ps.data_size > 1:
        # ZeRO-1: only this rank's slice of each bucket holds the reduced grad.
        data = torch.zeros_like(buf.buffer)
        for b in buf.buckets:
            lo, hi = buf.shard_range(b)
            gathered = comm.all_gather(buf.buffer[lo:hi].clone(), ps.data_group, "test")
            data[b.start:b.end] = gathered
    out = {}
    for name, p in trainer.model.named_parameters():
        start, n = buf.param_range[id(p)]
        g = data[start:start + n].view_as(p)
        dim = getattr(p, "tensor_parallel_dim", None)
        if dim is not None and ps.tensor_size > 1:
            # Replicated parameters' gradients are identical on every tp rank already.
            g = comm.all_gather(g.contiguous(), ps.tensor_group, "test", dim=dim)
        out[name] = g.detach().numpy().copy()
    return out


def train(cfg, pstate=None):
    from megatron_paci.training.trainer import Trainer

    trainer = Trainer(cfg, pstate)
    trainer.train()
    return trainer
