"""AdamW with Megatron's parameter groups, gradient clipping, and a flat state view.

The flat view keys optimizer state by parameter name (``exp_avg`` of
``layers.3.mlp.fc1.weight``), never by position, so checkpoints survive a
change of stage split or of the order parameters are registered in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_paci.config.schema import OptimConfig


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and norm gains are not decayed (Megatron's default grouping).
    return p.ndim < 2


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_weight_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    on_cuda = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=True if on_cuda else None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm(params: list[torch.Tensor]) -> float:
    """Global L2 norm of the gradients, computed in fp32."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    ).item()


def clip_gradients(params: list[torch.Tensor], max_norm: float, norm: float) -> None:
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)


STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def optimizer_state_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, create: bool = False
) -> dict[str, torch.Tensor]:
    """``{"<param>.<state key>": tensor}`` aliasing the optimizer's own tensors.

    With ``create``, missing state is allocated (zeros) first, so that a
    checkpoint loader can fill the tensors in place.
    """
    flat: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state[p]
        if create and not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key in STATE_KEYS:
            if key in state:
                flat[f"{name}.{key}"] = state[key]
    return flat
