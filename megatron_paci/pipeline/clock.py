"""Where a stage's action times come from.

On a CPU the host does the work, so the host clock times it. On a GPU the host only
queues kernels and runs ahead until something reads a result back: host times would
measure kernel launches, and every wait would land on whichever action reads first.
CUDA events recorded on the current stream time what the device did instead; a
stream-ordered receive completes before the next mark, so the time a stage spends
waiting for its neighbours stays out of its busy time on either clock.

A clock hands out marks; a duration is read once both marks have completed, which
never forces a device sync beyond the one the executor makes at a drain.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class HostClock:
    def mark(self) -> float:
        return time.perf_counter()

    def done(self, mark: float) -> bool:
        return True

    def wait(self, mark: float) -> None:
        pass

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaClock:
    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def done(self, mark: Any) -> bool:
        return mark.query()

    def wait(self, mark: Any) -> None:
        mark.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000.0


def clock_for(device: torch.device) -> HostClock | CudaClock:
    return CudaClock() if device.type == "cuda" else HostClock()
