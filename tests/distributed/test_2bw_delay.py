"""PipeDream-2BW's losses are exactly its one-step delayed update, computed without
the executor: W(k+1) = W(k) - lr * u(grad f_k(W(k-1))) on every stage (design.md: F(j)
and B(j) of window k both at v = max(0, k-2), on the first stage and the last alike).

The reference is ``delayed_update_losses`` in scripts/sweep_2bw_delay.py: plain torch
on the project's GPTModel (forward and backward only), with the weights the gradient is
taken at, ``torch.optim.AdamW`` and the LR written there. A 2BW run on 2 gloo ranks
(fp32, untied, unclipped) equals it with delay 1 to 1e-5 relative, and differs from
delay 0 (plain training) and delay 2, so the comparison tells the delays apart."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

from megatron_paci.data.sampler import build_pretraining_data_loader
from megatron_paci.model.gpt import GPTModel
from megatron_paci.training.trainer import Trainer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sweep_2bw_delay.py"
WINDOWS = 8


def _sweep_module():
    spec = importlib.util.spec_from_file_location("_sweep_2bw_delay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _config(prefix, run_dir, schedule, stages):
    return config(prefix, run_dir, WINDOWS, **{
        "model.num_layers": 4, "model.tie_embeddings": False, "pipeline.schedule": schedule,
        "parallel.pipeline": stages, "optim.lr": 3e-3, "optim.clip_grad": 0.0,
        "optim.weight_decay": 0.1})


def _run(rank, world, prefix, root):
    from megatron_paci.parallel.state import initialize

    trainer = train(_config(prefix, root, "pipedream_2bw", 2), initialize(1, 2))
    return losses(root) if trainer.log_enabled else None


def _reference(cfg, delay):
    sweep = _sweep_module()
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pipeline=1),
                              run=dataclasses.replace(cfg.run, dir=cfg.run.dir + "_ref"))
    ref = Trainer(one)  # dataset and vocabulary as the run builds them
    model = GPTModel(cfg.model, ref.vocab_size, seed=cfg.train.seed)
    mbs = cfg.train.micro_batch_size
    batches = (b["tokens"] for b in build_pretraining_data_loader(ref.train_ds, 0, mbs, 0, 1))
    o = cfg.optim
    lr = sweep.warmup_cosine(o.lr, o.min_lr, o.lr_warmup_iters, cfg.train.iters)
    return np.array(sweep.delayed_update_losses(
        model, batches, cfg.train.global_batch_size // mbs, WINDOWS, lr, delay,
        betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay))


def test_2bw_equals_the_plain_torch_one_step_delayed_update(tmp_path):
    prefix = make_dataset(str(tmp_path))
    run_dir = str(tmp_path / "2bw")
    got = np.array([r for r in spawn(_run, 2, args=(prefix, run_dir), timeout=300)
                    if r is not None][0])
    cfg = _config(prefix, str(tmp_path / "ref"), "pipedream_2bw", 2)
    assert cfg.optim.lr_warmup_iters > 0 and cfg.optim.lr_decay_style == "cosine"
    rel = {d: float((np.abs(got - _reference(cfg, d)) / got).max()) for d in (0, 1, 2)}
    assert rel[1] < 1e-5, rel
    assert rel[0] > 1e-3 and rel[2] > 1e-3, rel


def test_delay_zero_is_plain_training(tmp_path):
    """The reference itself: with delay 0 it is ordinary training, the one-process run."""
    prefix = make_dataset(str(tmp_path))
    cfg = _config(prefix, str(tmp_path / "one"), "1f1b_flush", 1)
    run = train(cfg)
    got = np.array(losses(run.cfg.run.dir))
    want = _reference(cfg, 0)
    assert float((np.abs(got - want) / want).max()) < 1e-5
