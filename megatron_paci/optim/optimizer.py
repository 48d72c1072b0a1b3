"""AdamW with Megatron's parameter groups, gradient clipping, and a flat state view.

The flat view keys optimizer state by parameter name (``exp_avg`` of
``layers.3.mlp.fc1.weight``), never by position, so checkpoints survive a
change of stage split or of the order parameters are registered in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from megatron_paci.config.schema import OptimConfig
from megatron_paci.kernels.dispatch import Kernels, reference_kernels
from megatron_paci.optim.distributed_optimizer import DistributedOptimizer
from megatron_paci.optim.grad_sync import GradBuffer
from megatron_paci.parallel import comm
from megatron_paci.parallel.state import ParallelState


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and norm gains are not decayed (Megatron's default grouping).
    return p.ndim < 2


AdamWBuilder = Callable[[list[dict], float, tuple[float, float], float], torch.optim.Optimizer]


def build_adamw(named: list[tuple[str, torch.Tensor]], cfg: OptimConfig,
                builder: AdamWBuilder | None = None) -> torch.optim.Optimizer:
    """AdamW over Megatron's decay groups, built by the kernel dispatcher's choice
    (``torch.optim.AdamW``, fused on CUDA, unless ``kernels`` picked apex's FusedAdam)."""
    decay, no_decay = [], []
    for name, p in named:
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    builder = builder or reference_kernels().adamw
    return builder([g for g in groups if g["params"]], cfg.lr,
                   (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)


def _steps_per_group(optimizer: torch.optim.Optimizer) -> bool:
    # torch's AdamW keeps a step count per parameter; apex's FusedAdam one per group.
    return not isinstance(optimizer, torch.optim.AdamW)


def _counted_once(p: torch.Tensor, tensor_rank: int) -> bool:
    """Each gradient counts once in the global norm: a tp-replicated one on tp rank 0
    only, and a tied embedding's copy on the last pipeline stage not at all."""
    if getattr(p, "pipeline_shared_copy", False):
        return False
    return getattr(p, "tensor_parallel_dim", None) is not None or tensor_rank == 0


class Optimizer:
    """The one optimizer path: fp32 ``main_grad`` synced over dp in overlapped
    buckets, sequence-parallel grads summed over tp, global-norm clipping,
    then AdamW — plain, or ZeRO-1 sharded over dp (``optim.distributed_optimizer``).
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, pstate: ParallelState,
                 clip_across_pipeline: bool = True, kernels: Kernels | None = None,
                 named: list[tuple[str, nn.Parameter]] | None = None):
        """``named``: the parameters it updates, by default all of ``model``'s (one model
        chunk's when chunks step on their own, see ``ChunkedOptimizer``)."""
        self.cfg = cfg
        self.pstate = pstate
        # 1F1B-flush clips by the norm over every stage; the asynchronous
        # schedules clip each stage by its own norm (no cross-stage sync).
        self.norm_pipeline_group = pstate.pipeline_group if clip_across_pipeline else None
        self.model = model
        named = list(model.named_parameters()) if named is None else named
        self.named = [(n, p) for n, p in named if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.grad_buffer = GradBuffer(
            self.named, pstate.data_group, bucket_size_bytes=cfg.grad_bucket_mb * 2**20,
            overlap=cfg.overlap_grad_reduce, reduce_scatter=cfg.distributed_optimizer,
        )
        self.sp_params = [p for p in self.params if getattr(p, "sequence_parallel", False)]
        self.tied_embedding: torch.Tensor | None = None
        self.distributed: DistributedOptimizer | None = None
        self.adamw: torch.optim.Optimizer | None = None
        kernels = kernels or reference_kernels()
        if cfg.distributed_optimizer:
            if kernels.choices["adamw"].backend != "torch":
                raise ValueError(
                    "optim.distributed_optimizer=true runs its own sharded AdamW, so kernel op "
                    f"'adamw' cannot be {kernels.choices['adamw'].backend} "
                    f"({kernels.choices['adamw'].why}); set kernels.overrides=[adamw=torch] "
                    "or optim.distributed_optimizer=false")
            self.distributed = DistributedOptimizer(
                self.named, self.grad_buffer, pstate.data_group, lr=cfg.lr,
                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                weight_decay=cfg.weight_decay, no_decay=no_weight_decay,
            )
            self._norm_weight = self._shard_norm_weights()
        else:
            # AdamW updates ``param.data`` aliases, which do not share the
            # parameter's autograd version counter: a backward still pending
            # (PACI's live weights) sees the new values instead of failing.
            self.aliases = [(n, p.data) for n, p in self.named]
            self.adamw = build_adamw(self.aliases, cfg, kernels.adamw)
        self._norm_segments = self._counted_segments()

    def tie_across_stages(self, param: torch.Tensor) -> None:
        """``param`` is this stage's copy of an embedding tied between the first and
        last pipeline stage; the last stage's copy is left out of the grad norm."""
        if self.distributed is not None:
            raise ValueError("optim.distributed_optimizer=true cannot keep an embedding tied "
                             "across pipeline stages; set model.tie_embeddings=false")
        self.tied_embedding = param

    def _counted_segments(self) -> list[tuple[int, int]]:
        """Buffer ranges of the gradients the norm counts, adjacent ones merged: a few
        reductions over the flat buffer instead of one (and a float64 copy) per parameter."""
        ranges = sorted(self.grad_buffer.param_range[id(p)] for p in self.params
                        if _counted_once(p, self.pstate.tensor_rank))
        merged: list[list[int]] = []
        for start, n in ranges:
            if merged and merged[-1][1] == start:
                merged[-1][1] = start + n
            else:
                merged.append([start, start + n])
        return [(lo, hi) for lo, hi in merged]

    def _shard_norm_weights(self) -> torch.Tensor:
        buf = self.grad_buffer
        full = torch.zeros(buf.numel, dtype=torch.float32, device=buf.buffer.device)
        for p in self.params:
            start, n = buf.param_range[id(p)]
            full[start:start + n] = float(_counted_once(p, self.pstate.tensor_rank))
        return torch.cat([full[lo:hi] for lo, hi in self.distributed.ranges])

    def zero_grad(self) -> None:
        self.grad_buffer.zero_grad()

    def no_sync(self):
        """Accumulate without communication (every micro-batch but the last)."""
        return self.grad_buffer.no_sync()

    def _grad_norm(self) -> float:
        ps = self.pstate
        if self.distributed is not None:
            shard = self.distributed.local_grad_shard().double()
            local = (shard.pow(2) * self._norm_weight.double()).sum()
            total = local.reshape(1)
            comm.all_reduce(total, ps.data_group, "dp")
        else:
            buf = self.grad_buffer.buffer
            total = torch.zeros(1, dtype=torch.float64, device=buf.device)
            for lo, hi in self._norm_segments:
                total += torch.linalg.vector_norm(buf[lo:hi], dtype=torch.float64).square()
        comm.all_reduce(total, ps.tensor_group, "tp")
        comm.all_reduce(total, self.norm_pipeline_group, "pp")
        return math.sqrt(total.item())

    def step(self, lr: float) -> tuple[float, bool]:
        """Finish the gradient sync, clip, update. Returns (grad norm, skipped)."""
        self.grad_buffer.finish_grad_sync()
        for p in self.sp_params:
            comm.all_reduce(p.main_grad, self.pstate.tensor_group, "tp")
        if self.tied_embedding is not None:
            # First and last pipeline stage hold copies of a tied embedding: after
            # the dp reduction, sum their gradients so both copies step alike.
            comm.all_reduce(self.tied_embedding.main_grad, self.pstate.embedding_group, "emb")
        norm = self._grad_norm()
        if not math.isfinite(norm):
            return norm, True
        scale = 1.0
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm + 1e-6)
        if self.distributed is not None:
            if scale != 1.0:
                self.distributed.scale_grads(scale)
            self.distributed.step(lr)
            return norm, False
        if scale != 1.0:
            self.grad_buffer.buffer.mul_(scale)  # every main_grad at once
        for p, (_, alias) in zip(self.params, self.aliases, strict=True):
            alias.grad = p.main_grad if p.dtype == torch.float32 else p.main_grad.to(p.dtype)
        set_lr(self.adamw, lr)
        self.adamw.step()
        for _, alias in self.aliases:
            alias.grad = None
        return norm, False

    def rebind_storage(self) -> None:
        """Move every parameter to a copy of its storage before an update.

        PipeDream-2BW publishes weight versions that alias the parameters'
        storage; after this, the update writes the copy and the published
        version keeps the old storage untouched.
        """
        if self.distributed is not None:
            raise RuntimeError("PipeDream-2BW does not support optim.distributed_optimizer")
        for p, (_, alias) in zip(self.params, self.aliases, strict=True):
            fresh = p.data.clone()
            p.data = fresh
            alias.set_(fresh)

    def state_by_name(self, create: bool = False) -> dict[str, torch.Tensor]:
        """Optimizer state keyed by parameter name, the same for both paths."""
        if self.distributed is not None:
            return self.distributed.state_by_name()
        return optimizer_state_by_name(self.aliases, self.adamw, create=create)

    def checkpoint_state(self, create: bool = False) -> dict[str, Any]:
        """What a checkpoint saves and loads in place, with no communication: the plain
        path's tensors by name; ZeRO-1's per-parameter ``FlatSlice`` lists of its shard."""
        if self.distributed is not None:
            return self.distributed.state_slices()
        return self.state_by_name(create=create)

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """After a load filled ``checkpoint_state()``'s tensors in place."""
        if self.distributed is not None:
            self.distributed.load_state_slices(state)
        else:
            self.load_state_by_name(state)

    def local_state(self) -> list[torch.Tensor]:
        """This rank's own optimizer tensors, with no communication (ZeRO-1: its shard of
        the moments): what a per-rank check reads, where ``state_by_name`` would gather."""
        if self.distributed is not None:
            return [self.distributed.exp_avg, self.distributed.exp_avg_sq]
        return list(optimizer_state_by_name(self.aliases, self.adamw).values())

    def load_state_by_name(self, state: dict[str, torch.Tensor]) -> None:
        """The plain path's tensors are loaded in place; the sharded path copies them
        in, and an optimizer counting steps per group takes its count from them."""
        if self.distributed is not None:
            self.distributed.load_state_by_name(state)
        elif _steps_per_group(self.adamw):
            load_group_steps(self.aliases, self.adamw, state)


class ChunkedOptimizer:
    """One ``Optimizer`` per model chunk, for schedules whose chunks step on their own
    (PACI and PipeDream-2BW with virtual stages): each chunk has its own gradient
    buffer, dp reduction, clipping norm and AdamW step. State is keyed by parameter
    name as in ``Optimizer``, so a checkpoint does not know how the rank was split."""

    def __init__(self, optimizers: list[Optimizer]):
        self.optimizers = optimizers

    def of(self, chunk: int) -> Optimizer:
        return self.optimizers[chunk]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad()

    def rebind_storage(self) -> None:
        for o in self.optimizers:
            o.rebind_storage()

    def tie_across_stages(self, param: torch.Tensor) -> None:
        raise ValueError("model chunks that step on their own cannot keep an embedding tied "
                         "across pipeline stages; set model.tie_embeddings=false")

    def state_by_name(self, create: bool = False) -> dict[str, torch.Tensor]:
        return {k: v for o in self.optimizers for k, v in o.state_by_name(create).items()}

    def checkpoint_state(self, create: bool = False) -> dict[str, Any]:
        return {k: v for o in self.optimizers for k, v in o.checkpoint_state(create).items()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        for o in self.optimizers:
            o.load_checkpoint_state(_own(o, state))

    def local_state(self) -> list[torch.Tensor]:
        return [t for o in self.optimizers for t in o.local_state()]

    def load_state_by_name(self, state: dict[str, torch.Tensor]) -> None:
        for o in self.optimizers:
            o.load_state_by_name(_own(o, state))


def _own(optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    prefixes = tuple(f"{n}." for n, _ in optimizer.named)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def optimizer_state_by_name(
    named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
    create: bool = False,
) -> dict[str, torch.Tensor]:
    """``{"<param>.<state key>": tensor}`` aliasing the optimizer's own tensors.

    With ``create``, missing state is allocated (zeros) first, so that a
    checkpoint loader can fill the tensors in place.

    An optimizer that counts steps per group (apex's FusedAdam) gets a ``step``
    tensor per parameter all the same, filled from its group, so checkpoints have
    one format whichever AdamW wrote them.
    """
    per_group = _steps_per_group(optimizer)
    group_step = {id(p): g.get("step", 0) for g in optimizer.param_groups for p in g["params"]}
    flat: dict[str, torch.Tensor] = {}
    for name, p in named:
        state = optimizer.state[p]
        if create and not state:
            if not per_group:
                state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if per_group and "exp_avg" in state:
            # A copy, not the optimizer's own: ``load_state_by_name`` reads it back.
            flat[f"{name}.step"] = torch.tensor(float(group_step[id(p)]))
        for key in STATE_KEYS:
            if key in state:
                flat[f"{name}.{key}"] = state[key]
    return flat


def load_group_steps(named: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                     state: dict[str, torch.Tensor]) -> None:
    """Set each group's step count from the loaded per-parameter ``step`` tensors."""
    name_of = {id(p): n for n, p in named}
    for group in optimizer.param_groups:
        steps = {int(state[f"{name_of[id(p)]}.step"].item()) for p in group["params"]
                 if f"{name_of[id(p)]}.step" in state}
        if len(steps) > 1:
            raise ValueError(f"optimizer checkpoint: parameters of one group disagree on the "
                             f"step count: {sorted(steps)}")
        if steps:
            group["step"] = steps.pop()
