"""Learning-rate schedule: linear warm-up, then cosine / linear decay to ``min_lr``.

Stateless in the step count, so a resumed run (or a pipeline stage stepping on
its own count) gets exactly the LR an uninterrupted run would have had.
"""

from __future__ import annotations

import math

from megatron_paci.config.schema import OptimConfig


class LRSchedule:
    def __init__(self, cfg: OptimConfig, total_iters: int):
        self.max_lr = cfg.lr
        self.min_lr = cfg.min_lr
        self.warmup = cfg.lr_warmup_iters
        self.decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else total_iters
        self.style = cfg.lr_decay_style
        self.num_steps = 0

    def lr_at(self, step: int) -> float:
        """LR for the update that follows ``step`` completed updates."""
        if self.warmup > 0 and step < self.warmup:
            return self.max_lr * (step + 1) / self.warmup
        if self.style == "constant":
            return self.max_lr
        span = max(1, self.decay_iters - self.warmup)
        progress = min(1.0, max(0.0, (step - self.warmup) / span))
        if self.style == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    @property
    def lr(self) -> float:
        return self.lr_at(self.num_steps)

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict[str, int]:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_steps = int(state["num_steps"])
