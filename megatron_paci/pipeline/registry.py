"""The schedule registry: each schedule is one declared ``ScheduleSpec``.

Everything outside ``pipeline/`` (config checks, the trainer, the layout check, the
benchmarks, the docs) asks this registry what a schedule does; nothing tests a name.
A new schedule is one ``register(ScheduleSpec(...))`` call (see
docs/schedules/adding_a_schedule.md); ``pipeline.schedule=file:PATH`` loads one from a
file of per-rank action lists (schedule_file.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_paci.config.schema import ModelConfig
from megatron_paci.pipeline.actions import Action
from megatron_paci.pipeline.versions import LIVE, VersionTable, WeightRule

# (stages P, stage s, window, number of windows, first window, chunks per rank) -> actions
BuildFn = Callable[[int, int, int, int, int, int], list[Action]]
# (stages, window, chunks) -> why the schedule cannot run that size, or None
RequireFn = Callable[[int, int, int], str | None]


@dataclass(frozen=True)
class ScheduleSpec:
    """What the rest of the system needs to know about a schedule, in one place."""

    name: str
    title: str
    build: BuildFn
    # A STEP after every window on every stage at once: the flush, the dp all-reduce and
    # global grad-norm clipping. Otherwise every stage steps on its own.
    global_step: bool
    # Tied input/output embeddings on different stages need a first/last-stage
    # all-reduce at every step: only a globally stepping schedule can afford it.
    tied_embeddings_across_stages: bool
    weights: WeightRule = LIVE
    # Most model chunks (virtual stages) per rank it can run; None for any number.
    max_chunks: int | None = 1
    chunks_note: str = ""  # why not more chunks, for the error
    requires: RequireFn | None = None
    summary: str = ""

    @property
    def stashes_weights(self) -> bool:
        return self.weights.copies > 1

    @property
    def steps_per_chunk(self) -> bool:
        """Whether a STEP updates its own model chunk only: true for every schedule that
        steps locally (with one chunk per rank, the chunk is the stage)."""
        return not self.global_step

    def optimizer_per_chunk(self, chunks: int) -> bool:
        """Whether a rank holding ``chunks`` model chunks needs one optimizer (and one
        weight-version policy) per chunk: its chunks step on their own."""
        return self.steps_per_chunk and chunks > 1

    def problem(self, stages: int, window: int, chunks: int = 1,
                distributed_optimizer: bool = False) -> str | None:
        """Why this schedule cannot run the layout (naming the sizes), or None."""
        if window < 1:
            return f"window must be >= 1 micro-batch, got {window}: a window of zero never steps"
        if chunks < 1:
            return f"parallel.virtual_pipeline must be >= 1, got {chunks}"
        if self.max_chunks is not None and chunks > self.max_chunks:
            return (f"pipeline.schedule={self.name} ({self.title}) runs at most "
                    f"{self.max_chunks} model chunk(s) per rank; parallel.virtual_pipeline="
                    f"{chunks}" + (f": {self.chunks_note}" if self.chunks_note else ""))
        if self.stashes_weights and distributed_optimizer:
            return (f"pipeline.schedule={self.name} does not support "
                    "optim.distributed_optimizer=true (its weight stash needs whole parameters)")
        return self.requires(stages, window, chunks) if self.requires else None

    def check(self, stages: int, window: int, chunks: int = 1,
              distributed_optimizer: bool = False) -> None:
        """Raise ValueError naming the sizes when this schedule cannot run the layout."""
        problem = self.problem(stages, window, chunks, distributed_optimizer)
        if problem:
            raise ValueError(problem)

    def actions(self, stages: int, stage: int, window: int, num_windows: int,
                first_window: int = 1, chunks: int = 1) -> list[Action]:
        """Rank ``stage``'s actions for ``num_windows`` windows from ``first_window``.

        ``first_window > 1`` continues the numbering after an earlier segment (a drain
        for evaluation or a checkpoint); every segment starts with a warm-up."""
        if not 0 <= stage < stages:
            raise ValueError(f"stage {stage} out of range for {stages} stages")
        if num_windows < 0 or first_window < 1:
            raise ValueError(f"need num_windows >= 0 and first_window >= 1, got "
                             f"{num_windows} and {first_window}")
        self.check(stages, window, chunks)
        return self.build(stages, stage, window, num_windows, first_window, chunks)

    def versions(self, stages: int, stage: int, window: int, num_windows: int,
                 first_window: int = 1, chunks: int = 1) -> VersionTable:
        """``(chunk, j) -> (v_F, v_B)`` under this schedule's weight-version policy."""
        acts = self.actions(stages, stage, window, num_windows, first_window, chunks)
        return self.weights.table(acts, window, first_window - 1, self.steps_per_chunk)

    def stage_model_config(self, model: ModelConfig, stages: int) -> ModelConfig:
        """The model config a stage is built with: a tied head becomes untied when the
        stages cannot keep the two copies in sync (the asynchronous schedules)."""
        if stages > 1 and model.tie_embeddings and not self.tied_embeddings_across_stages:
            return dataclasses.replace(model, tie_embeddings=False)
        return model

    def make_policy(self, model: nn.Module, window: int,
                    accumulate: Callable[[nn.Parameter, torch.Tensor], None],
                    rebind: Callable[[], None],
                    params: list[tuple[str, nn.Parameter]] | None = None):
        return self.weights.make(model, window, accumulate, rebind, params)


_REGISTRY: dict[str, ScheduleSpec] = {}
FILE_PREFIX = "file:"


def register(spec: ScheduleSpec) -> ScheduleSpec:
    """Declare a schedule; its name must be new. Returns the spec (usable as a decorator
    result or a plain call)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"a schedule named {spec.name!r} is registered already")
    if spec.name.startswith(FILE_PREFIX):
        raise ValueError(f"schedule names may not start with {FILE_PREFIX!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a schedule (tests that declare a toy one clean up with this)."""
    _REGISTRY.pop(name, None)


def _builtins() -> None:
    from megatron_paci.pipeline import schedules  # noqa: F401  (registers the built-ins)


def schedule_names() -> tuple[str, ...]:
    """Every registered schedule, built-ins first, in declaration order."""
    _builtins()
    return tuple(_REGISTRY)


def get_schedule(name: str) -> ScheduleSpec:
    """The spec for ``pipeline.schedule``: a registered name or ``file:PATH``."""
    _builtins()
    if name.startswith(FILE_PREFIX):
        from megatron_paci.pipeline.schedule_file import load_schedule_file

        return load_schedule_file(name[len(FILE_PREFIX):])
    if name not in _REGISTRY:
        raise ValueError(f"unknown pipeline.schedule '{name}': choose one of "
                         f"{', '.join(_REGISTRY)}, or file:PATH for a schedule file")
    return _REGISTRY[name]
