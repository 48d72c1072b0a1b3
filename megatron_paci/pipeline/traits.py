"""What the rest of the system needs to know about a schedule, in one place.

Code outside ``pipeline/`` asks these traits instead of testing the
schedule's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_paci.config.schema import ModelConfig
from megatron_paci.pipeline.schedules import SCHEDULES
from megatron_paci.pipeline.versions import LiveWeights, TwoVersionStash


@dataclass(frozen=True)
class ScheduleTraits:
    name: str
    title: str
    # A STEP after every window on every stage, with global grad-norm clipping.
    global_step: bool
    # Tied input/output embeddings on different stages need an all-reduce between
    # the first and last stage every step: only a globally stepping schedule
    # can afford that synchronisation.
    tied_embeddings_across_stages: bool
    stashes_weights: bool

    def check(self, stages: int, window: int, distributed_optimizer: bool) -> None:
        """Raise ValueError (naming the sizes) when this schedule cannot run the layout."""
        if self.stashes_weights and window < stages - 1:
            raise ValueError(
                f"{self.title} needs m >= P-1: the window m = train.global_batch_size / "
                f"(train.micro_batch_size x dp) = {window} < parallel.pipeline-1 = {stages - 1}")
        if self.stashes_weights and distributed_optimizer:
            raise ValueError(
                f"pipeline.schedule={self.name} does not support "
                "optim.distributed_optimizer=true (its weight stash needs whole parameters)")

    def stage_model_config(self, model: ModelConfig, stages: int) -> ModelConfig:
        """The model config a stage is built with: a tied head becomes untied when the
        stages cannot keep the two copies in sync (the asynchronous schedules)."""
        if stages > 1 and model.tie_embeddings and not self.tied_embeddings_across_stages:
            return dataclasses.replace(model, tie_embeddings=False)
        return model

    def make_policy(self, model: nn.Module, window: int,
                    accumulate: Callable[[nn.Parameter, torch.Tensor], None],
                    rebind: Callable[[], None]):
        if self.stashes_weights:
            return TwoVersionStash(model, window, accumulate, rebind)
        return LiveWeights(model)


TRAITS = {
    "1f1b_flush": ScheduleTraits("1f1b_flush", "1F1B-flush", True, True, False),
    "pipedream_2bw": ScheduleTraits("pipedream_2bw", "PipeDream-2BW", False, False, True),
    "paci": ScheduleTraits("paci", "PACI", False, False, False),
}
assert set(TRAITS) == set(SCHEDULES)


def schedule_traits(name: str) -> ScheduleTraits:
    if name not in TRAITS:
        raise ValueError(f"unknown pipeline.schedule '{name}': choose one of "
                         f"{', '.join(SCHEDULES)}")
    return TRAITS[name]
