"""A sequential oracle: each schedule's update rule in one process, no executor.

Micro-batches run one at a time through every stage, forward then backward.
Before the forward of micro-batch j on stage s, the stage's parameters are
set to the weight version the schedule says F(j) sees; before its backward,
to the version B(j) sees (an in-place write, so the pending backward uses
those weights for its input gradient and the activations saved at the
forward for its weight gradient: the live-weight rule). A stage's gradients
are summed over its window and applied to its newest version with the same
AdamW arithmetic, LR schedule and clipping rule the real run uses.

The versions come from the schedule's action lists (schedules.py), whose
tables are tested against design.md's formulas; nothing here shares code
with the executor or the weight-version policies, so distributed runs can be
compared against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from megatron_paci.config.schema import OptimConfig
from megatron_paci.optim.lr_schedule import LRSchedule
from megatron_paci.optim.optimizer import build_adamw, set_lr
from megatron_paci.pipeline.schedules import schedule_versions


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _load(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write a version into the parameters' storage; through ``.data`` so that a
    pending backward (saved at another version) uses it instead of failing."""
    for n, p in model.named_parameters():
        p.data.copy_(weights[n])


def emulate(
    schedule: str,
    stages: list[nn.Module],
    batches: Iterator[dict[str, torch.Tensor]],
    window: int,
    num_windows: int,
    optim_cfg: OptimConfig,
    total_iters: int,
    global_clip: bool,
    tied: tuple[str, str] | None = None,
    segments: list[int] | None = None,
) -> list[float]:
    """Mean loss per window. ``batches`` yields the whole (all dp ranks) micro-batch j.

    ``tied`` names the first stage's embedding and the last stage's output
    weight when they are tied copies whose gradients are summed (1F1B-flush).
    ``segments`` are the windows between drains (evaluation, checkpoints): each
    starts with a fresh warm-up, which changes the versions PACI's forwards see.
    """
    P = len(stages)
    segments = segments or [num_windows]
    if sum(segments) != num_windows:
        raise ValueError(f"segments {segments} do not add up to {num_windows} windows")
    versions: list[dict[int, tuple[int, int]]] = [{} for _ in range(P)]
    first = 1
    for n in segments:
        for s in range(P):
            versions[s].update(schedule_versions(schedule, P, s, window, n, first))
        first += n
    history = [{0: _snapshot(m)} for m in stages]  # stage -> version -> weights
    optimizers = [build_adamw([(n, p) for n, p in m.named_parameters()], optim_cfg)
                  for m in stages]
    lr = [LRSchedule(optim_cfg, total_iters) for _ in stages]
    grads = [{n: torch.zeros_like(p) for n, p in m.named_parameters()} for m in stages]
    window_losses: list[float] = []
    losses: list[float] = []
    for j in range(1, window * num_windows + 1):
        tokens = next(batches)["tokens"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        outputs, received = [], []
        x = None
        for s, model in enumerate(stages):
            _load(model, history[s][versions[s][j][0]])
            h = None
            if s > 0:
                h = x.detach().requires_grad_(True)
            out = model(tokens=inputs if s == 0 else None, hidden=h,
                        labels=labels if s == P - 1 else None)
            received.append(h)
            outputs.append(out)
            x = out
        loss = outputs[-1].mean()
        losses.append(loss.item())
        grad = None
        for s in reversed(range(P)):
            model = stages[s]
            _load(model, history[s][versions[s][j][1]])
            for p in model.parameters():
                p.grad = None
            if s == P - 1:
                (loss / window).backward()
            else:
                outputs[s].backward(grad)
            for n, p in model.named_parameters():
                if p.grad is not None:
                    grads[s][n] += p.grad
            grad = received[s].grad if s > 0 else None
        if j % window == 0:
            window_losses.append(sum(losses) / len(losses))
            losses = []
            _step_all(stages, history, optimizers, lr, grads, optim_cfg, global_clip, tied)
    return window_losses


def _step_all(stages, history, optimizers, lr, grads, cfg: OptimConfig, global_clip: bool,
              tied: tuple[str, str] | None) -> None:
    """Every stage steps after the window's last backward (its newest version + grads)."""
    if tied is not None:
        first, last = tied
        total = grads[0][first] + grads[-1][last]
        grads[0][first].copy_(total)
        grads[-1][last].copy_(total)
    sq = [sum(float(g.double().pow(2).sum()) for g in stage_grads.values())
          for stage_grads in grads]
    if tied is not None:
        sq[-1] -= float(grads[-1][tied[1]].double().pow(2).sum())  # count the tie once
    norms = [math.sqrt(sum(sq))] * len(stages) if global_clip else [math.sqrt(v) for v in sq]
    for s, model in enumerate(stages):
        newest = max(history[s])
        _load(model, history[s][newest])
        scale = 1.0
        if cfg.clip_grad > 0 and norms[s] > cfg.clip_grad:
            scale = cfg.clip_grad / (norms[s] + 1e-6)
        for n, p in model.named_parameters():
            p.grad = grads[s][n] * scale
        set_lr(optimizers[s], lr[s].lr)
        optimizers[s].step()
        lr[s].step()
        history[s][newest + 1] = _snapshot(model)
        for g in grads[s].values():
            g.zero_()
