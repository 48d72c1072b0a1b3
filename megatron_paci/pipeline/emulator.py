"""A sequential oracle: each schedule's update rule in one process, no executor.

Micro-batches run one at a time through every stage, forward then backward.
Before the forward of micro-batch j on stage s, the stage's parameters are
set to the weight version F(j) sees; before its backward, to the version B(j)
sees (an in-place write through ``.data``, so the pending backward uses those
weights for its input gradient and the activations saved at the forward for
its weight gradient: the fp32 live-weight rule). A stage's gradients are
summed over its window and applied to its newest version.

Nothing here comes from the code it checks: the version tables are
design.md's formulas written out below (not the schedules' action lists or
the weight-version policies), the LR is a hand-coded warm-up + decay, and the
update is ``torch.optim.AdamW`` over decay groups built here. An error in
``pipeline/schedules.py``, ``pipeline/versions.py`` or ``optim/`` therefore
shows up as a disagreement with this oracle instead of being copied into it.

Only fp32 is modelled. Under bf16 autocast a pending backward takes a
Linear's input gradient at the bf16 copy made at its forward, not at the live
weights (docs/schedules/paci.md, "bf16"); the emulator does not model that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from megatron_paci.config.schema import OptimConfig

Versions = dict[int, tuple[int, int]]  # j -> (v_F, v_B)


# --- design.md's version tables, one segment (windows first .. first+n-1) -----------

def _micro_batches(window: int, num_windows: int, first_window: int) -> range:
    return range((first_window - 1) * window + 1, (first_window - 1 + num_windows) * window + 1)


def flush_versions(stages: int, stage: int, window: int, num_windows: int,
                   first_window: int = 1) -> Versions:
    """1F1B-flush: F(j) and B(j) both at v = floor((j-1)/M)."""
    return {j: ((j - 1) // window,) * 2
            for j in _micro_batches(window, num_windows, first_window)}


def two_bw_versions(stages: int, stage: int, window: int, num_windows: int,
                    first_window: int = 1) -> Versions:
    """PipeDream-2BW, every stage: F(j) and B(j) at v = max(0, floor((j-1)/m) - 1)."""
    return {j: (max(0, (j - 1) // window - 1),) * 2
            for j in _micro_batches(window, num_windows, first_window)}


def paci_versions(stages: int, stage: int, window: int, num_windows: int,
                  first_window: int = 1) -> Versions:
    """PACI: v_B = floor((j-1)/a), v_F = floor(max(0, j-(P-s))/a) in the steady order.

    A segment after a drain starts with a fresh warm-up, so v_F counts j from the
    segment's first micro-batch on top of the updates of earlier segments."""
    done = first_window - 1
    out = {}
    for j in _micro_batches(window, num_windows, first_window):
        local = j - done * window
        out[j] = (done + max(0, local - (stages - stage)) // window, (j - 1) // window)
    return out


def interleaved_paci_versions(stages: int, stage: int, window: int, num_windows: int,
                              first_window: int, chunks: int, chunk: int) -> Versions:
    """PACI with v model chunks per rank, each stepping after its own window of
    backwards: v_B = floor((j-1)/a) as without chunks; v_F counts the windows of the
    chunk whose last backward ran before F(j, c) in Megatron's interleaved order.

    In that order (over the segment's N micro-batches; local i = j-1 from the segment's
    start) the forward of (j, c) is virtual micro-batch f = (i//P)Pv + cP + i%P and its
    backward b = (i//P)Pv + (v-1-c)P + i%P; rank s first runs w = min(2(P-s-1) + (v-1)P,
    Nv) forwards (all Nv when N = P), then forward w+i right before backward i, so the
    forward f follows exactly max(0, f - w) backwards."""
    p, v = stages, chunks
    done = first_window - 1
    n = window * num_windows
    warm = n * v if n == p else min(2 * (p - stage - 1) + (v - 1) * p, n * v)

    def forward_at(i: int) -> int:  # i: the local 0-based micro-batch
        return (i // p) * p * v + chunk * p + i % p

    def backward_at(i: int) -> int:
        return (i // p) * p * v + (v - 1 - chunk) * p + i % p

    out = {}
    for j in _micro_batches(window, num_windows, first_window):
        backwards_before = max(0, forward_at(j - 1 - done * window) - warm)
        stepped = sum(1 for k in range(1, num_windows + 1)
                      if backward_at(k * window - 1) < backwards_before)
        out[j] = (done + stepped, (j - 1) // window)
    return out


def _paci(stages, stage, window, num_windows, first_window, chunks=1, chunk=0) -> Versions:
    if chunks == 1:
        return paci_versions(stages, stage, window, num_windows, first_window)
    return interleaved_paci_versions(stages, stage, window, num_windows, first_window,
                                     chunks, chunk)


def _same_for_chunks(formula):
    """Flush and 2BW: a chunk's versions follow the rank's formula (each chunk of 2BW
    keeps its own two versions, one window apart)."""
    def versions(stages, stage, window, num_windows, first_window, chunks=1, chunk=0):
        return formula(stages, stage, window, num_windows, first_window)
    return versions


@dataclass(frozen=True)
class OracleRule:
    # (P, s, window, windows, first window, chunks per rank, chunk) -> versions
    versions: Callable[..., Versions]
    global_clip: bool  # flush clips by the norm over every stage; the others per stage


RULES = {
    "1f1b_flush": OracleRule(_same_for_chunks(flush_versions), global_clip=True),
    "pipedream_2bw": OracleRule(_same_for_chunks(two_bw_versions), global_clip=False),
    "paci": OracleRule(_paci, global_clip=False),
}


# --- LR and AdamW, written here ----------------------------------------------------

def learning_rate(cfg: OptimConfig, total_iters: int, done: int) -> float:
    """LR of the update after ``done`` updates: linear warm-up to ``lr`` over
    ``lr_warmup_iters`` updates (the first at lr/warmup), then constant, or a
    linear or cosine fall to ``min_lr`` reached at ``lr_decay_iters`` (default:
    ``total_iters``) and held after."""
    warm = cfg.lr_warmup_iters
    if done < warm:
        return cfg.lr * (done + 1) / warm
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    end = total_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    t = (done - warm) / max(1, end - warm)
    t = min(1.0, max(0.0, t))
    shape = 1.0 - t if cfg.lr_decay_style == "linear" else (1.0 + math.cos(math.pi * t)) / 2
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def _adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Matrices decay; biases and norm gains (fewer than 2 dims) do not."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


# --- the emulation -------------------------------------------------------------------

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
    tied: tuple[str, str] | None = None,
    segments: list[int] | None = None,
    chunks: int = 1,
) -> list[float]:
    """Mean loss per window. ``batches`` yields the whole (all dp ranks) micro-batch j.

    ``stages`` are the virtual stages in pipeline order: with ``chunks`` model chunks
    per rank, stage u is chunk u // P of rank u % P (P = len(stages) / chunks), and
    each steps by its own norm unless the schedule clips globally.

    ``tied`` names the first stage's embedding and the last stage's output
    weight when they are tied copies whose gradients are summed (1F1B-flush).
    ``segments`` are the windows between drains (evaluation, checkpoints): each
    starts with a fresh warm-up, which changes the versions PACI's forwards see.
    """
    if schedule not in RULES:
        raise ValueError(f"the emulator models {sorted(RULES)}, not schedule '{schedule}'")
    rule = RULES[schedule]
    P = len(stages)  # virtual stages from here on
    ranks = P // chunks
    segments = segments or [num_windows]
    if sum(segments) != num_windows:
        raise ValueError(f"segments {segments} do not add up to {num_windows} windows")
    versions: list[Versions] = [{} for _ in range(P)]
    first = 1
    for n in segments:
        for u in range(P):
            versions[u].update(rule.versions(ranks, u % ranks, window, n, first, chunks,
                                             u // ranks))
        first += n
    history = [{0: _snapshot(m)} for m in stages]  # stage -> version -> weights
    optimizers = [_adamw(m, optim_cfg) for m in stages]
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
            lr = learning_rate(optim_cfg, total_iters, j // window - 1)
            _step_all(stages, history, optimizers, lr, grads, optim_cfg, rule.global_clip, tied)
    return window_losses


def _step_all(stages, history, optimizers, lr: float, grads, cfg: OptimConfig,
              global_clip: bool, tied: tuple[str, str] | None) -> None:
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
        for group in optimizers[s].param_groups:
            group["lr"] = lr
        optimizers[s].step()
        history[s][newest + 1] = _snapshot(model)
        for g in grads[s].values():
            g.zero_()
