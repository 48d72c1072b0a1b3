"""Stopping for a preemption or a time limit: save at a drain every rank agrees on, exit.

SIGTERM and SIGUSR1 (slurm's ``--signal``, a preempting scheduler) only set a flag.
The ranks agree on it at the pipeline's drains, with one small all-reduce per drain:
never per micro-batch, and never in the middle of a window, so the checkpoint is the
one an uninterrupted run would pass through and a requeued run continues it bit for
bit, under every schedule. ``train.exit_check_interval=N`` adds a drain every N
iterations for the check (a flushing schedule drains every window anyway; PACI and
2BW pay one fill and drain per N windows); ``train.exit_duration_mins`` asks for the
same stop once the run has lasted that long (Megatron's time-based exit).

The process then exits with ``EXIT_REQUEUE`` (75, EX_TEMPFAIL), which the sbatch
file turns into ``scontrol requeue``. Under torchrun the code becomes torchrun's own 1
(it takes any non-zero worker exit for a failure); srun, which the sbatch file uses,
passes it through. wandb continues the same run after a relaunch (metrics.py keeps
its id in the run directory).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_paci.parallel import comm
from megatron_paci.training.exit_codes import EXIT_REQUEUE  # noqa: F401  (75, EX_TEMPFAIL)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """This process's pending stop request, and the agreement over all ranks."""

    def __init__(self, duration_mins: float = 0.0) -> None:
        self.signum: int | None = None
        self.duration_mins = duration_mins
        self.start = time.monotonic()
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Catch the stop signals (main thread only; elsewhere the default stays).
        Returns whether this call installed them (False if they already were)."""
        if self._previous:
            return False
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                return bool(self._previous)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGTERM:
            # A second SIGTERM (a launcher tearing the job down, torchrun after a peer
            # failed) means now: the default action, as if nothing were caught.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def local_reason(self) -> int:
        """0: nothing; 1: out of time (train.exit_duration_mins); 2: a signal."""
        if self.signum is not None:
            return 2
        if self.duration_mins > 0 and time.monotonic() - self.start >= 60 * self.duration_mins:
            return 1
        return 0

    def agreed(self, device: torch.device) -> int:
        """The strongest reason any rank has (a collective: every rank calls it at the
        same drain)."""
        reason = torch.tensor([float(self.local_reason())], device=device)
        if dist.is_available() and dist.is_initialized():
            comm.all_reduce_max(reason, dist.group.WORLD, "world")
        return int(reason.item())


def describe(reason: int) -> str:
    return {1: "train.exit_duration_mins reached", 2: "a stop signal (SIGTERM or SIGUSR1) "
            "reached a rank"}.get(reason, "")


def test_signal_hook(iteration: int, rank: int, where: str = "step") -> None:
    """Tests send a real signal at a known point: MEGATRON_PACI_TEST_SIGNAL=ITER:RANK
    (SIGUSR1 right after STEP ITER), ITER:RANK:save (inside the save at ITER) or
    ITER:RANK:kill (SIGKILL right after STEP ITER: a rank that dies)."""
    spec = os.environ.get("MEGATRON_PACI_TEST_SIGNAL")
    if not spec:
        return
    at, who, place = (spec.split(":") + ["", ""])[:3]
    place = place or "step"
    if iteration == int(at) and rank == int(who or 0) and where == (
            "step" if place == "kill" else place):
        os.kill(os.getpid(), signal.SIGKILL if place == "kill" else signal.SIGUSR1)
