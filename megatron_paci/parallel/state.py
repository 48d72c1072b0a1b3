"""Where this process sits in the world (tp x pp x dp).

The foundation runs one process; the parallelism issue fills in the groups.
Everything above this layer asks this object for ranks instead of reading the
environment itself, so adding groups changes no caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tensor_rank: int = 0
    tensor_size: int = 1
    pipeline_rank: int = 0
    pipeline_size: int = 1
    data_rank: int = 0
    data_size: int = 1

    @property
    def is_logging_rank(self) -> bool:
        # The loss lives on the last pipeline stage; log from its first tp/dp rank.
        return (self.pipeline_rank == self.pipeline_size - 1 and self.tensor_rank == 0
                and self.data_rank == 0)


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or slurm's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def single_process() -> ParallelState:
    return ParallelState()


def init_parallel_state(tensor: int, pipeline: int) -> ParallelState:
    """The layout of this launch; refuses layouts this build cannot run yet."""
    rank, world, _ = world_from_env()
    if world == 1 and tensor * pipeline == 1:
        return single_process()
    raise ValueError(
        f"world size {world} with parallel.tensor={tensor} x parallel.pipeline={pipeline}: "
        "multi-process training is not available in this build yet; launch one process "
        "with parallel.tensor=1 parallel.pipeline=1"
    )
