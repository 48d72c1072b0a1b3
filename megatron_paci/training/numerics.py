"""Numerical faults: skipped updates counted per stage, a limit, a loss-spike guard, and
the check that keeps a non-finite state out of every checkpoint.

An update is skipped where its gradient norm is not finite (optim/optimizer.py); the
step still counts for the weight-version rules and the LR schedule, so the windows of
every stage stay aligned under the asynchronous schedules. A non-finite loss on the
last stage makes every gradient upstream non-finite, so each stage skips that window on
its own, with no extra communication. The spike guard uses the same path: a micro-batch
whose loss is above ``train.loss_spike_factor`` times the running mean gets a NaN
factor on its loss before the backward, which every stage then sees as a non-finite
gradient. The comparison stays on the device (no host read per micro-batch).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from megatron_paci.parallel import comm


class TrainingDiverged(RuntimeError):
    """``train.max_consecutive_skips`` updates in a row were skipped on one stage.

    ``report`` says whether this rank prints the error (one line per stage that
    stopped, or one for the whole run when the schedule decides skips globally)."""

    def __init__(self, message: str, report: bool) -> None:
        super().__init__(message)
        self.report = report


SPIKE_WARMUP_WINDOWS = 10  # the guard starts once the running mean has this many windows
SPIKE_MEAN_WINDOWS = 100  # the running mean is over the last this many finite windows


class LossSpikeGuard:
    """Running mean of the window losses on the last stage, kept on the host (they are
    read there for the log anyway), and a device-side factor for each micro-batch."""

    def __init__(self, factor: float, device: torch.device) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=SPIKE_MEAN_WINDOWS)
        self.threshold = torch.tensor(math.inf, device=device)
        self.nan = torch.tensor(math.nan, device=device)
        self.one = torch.tensor(1.0, device=device)

    def mean(self) -> float | None:
        if len(self.history) < SPIKE_WARMUP_WINDOWS:
            return None
        return sum(self.history) / len(self.history)

    def multiplier(self, loss: torch.Tensor) -> torch.Tensor:
        """1, or NaN for a spike: the loss is multiplied by it before the backward."""
        return torch.where(loss.detach() > self.threshold, self.nan, self.one)

    def is_spike(self, loss: float) -> bool:
        mean = self.mean()
        return mean is not None and loss > self.factor * mean

    def observe(self, loss: float) -> None:
        """A window's loss (finite, not a spike) joins the running mean."""
        self.history.append(loss)
        mean = self.mean()
        self.threshold.fill_(math.inf if mean is None else self.factor * mean)


class SkipCounter:
    """This rank's skipped updates: the total, the current run of them, and the stop."""

    def __init__(self, limit: int, stage: int, global_decision: bool, report: bool) -> None:
        self.limit = limit
        self.stage = stage
        self.global_decision = global_decision
        self.report = report  # this rank speaks for its stage (or for the run)
        self.total = 0
        self.streak = 0
        self.streak_start = 0

    def record(self, iteration: int, skipped: bool, why: str) -> str | None:
        """Count one step; the line to log for a skip (None otherwise). Raises
        TrainingDiverged when the streak reaches the limit."""
        if not skipped:
            self.streak = 0
            return None
        self.total += 1
        if self.streak == 0:
            self.streak_start = iteration
        self.streak += 1
        where = "every stage" if self.global_decision else f"stage {self.stage}"
        limit = f" of train.max_consecutive_skips={self.limit}" if self.limit else ""
        line = (f"iteration {iteration}: {why}; update skipped on {where} "
                f"({self.streak} in a row{limit}, {self.total} in total)")
        if self.limit and self.streak >= self.limit:
            raise TrainingDiverged(
                f"training stopped at iteration {iteration}: {self.streak} consecutive "
                f"updates skipped on {where} (iterations {self.streak_start}-{iteration}; "
                f"last: {why}). Resume from the newest checkpoint with a lower optim.lr or "
                "a longer optim.lr_warmup_iters, or set train.max_consecutive_skips=0 to "
                "keep skipping", self.report)
        return line


def save_blockers(tensors: list[torch.Tensor], streak: int,
                  device: torch.device) -> tuple[bool, bool]:
    """(some rank holds a non-finite weight or optimizer moment, some rank is in a run of
    skipped updates): a collective at a drain, every rank calls it before a save; one
    all-reduce of two flags."""
    bad = any(not bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    flags = torch.tensor([float(bad), float(streak > 0)], device=device)
    if dist.is_available() and dist.is_initialized():
        comm.all_reduce_max(flags, dist.group.WORLD, "world")
    return flags[0].item() > 0, flags[1].item() > 0
