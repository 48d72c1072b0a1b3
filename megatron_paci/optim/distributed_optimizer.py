"""ZeRO-1 AdamW: each data-parallel rank keeps and updates only its 1/dp shard of the state.

Why: Adam's two moments plus fp32 master weights are 12 bytes per parameter;
sharding them over dp divides that memory by dp for the price of turning the
gradient all-reduce into a reduce-scatter plus a parameter all-gather (the same
ring bytes in total).

Layout: a flat fp32 parameter buffer mirrors the ``GradBuffer`` layout, so this
rank's shard of a bucket is the same ``[lo, hi)`` range in both buffers. fp32
parameters alias that buffer through ``param.data`` (no extra copy; updates do
not bump the autograd version counter, which the pipeline schedules rely on);
other dtypes (bf16) keep the buffer as their fp32 master copy and are cast back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_paci.optim.grad_sync import GradBuffer
from megatron_paci.parallel import comm


@dataclass(frozen=True)
class FlatSlice:
    """A run of one parameter's elements, in row-major order, that this rank's shard owns:
    how a checkpoint writes ZeRO-1 state without gathering it (and reads it back into
    place)."""

    shape: torch.Size  # the parameter's shape on this rank (a tp shard's local shape)
    start: int  # flat index, in the parameter, of ``values[0]``
    values: torch.Tensor  # 1-D view into this rank's moment shard


class DistributedOptimizer:
    """AdamW with the arithmetic of ``torch.optim.AdamW`` (single-tensor path), sharded over dp.

    The caller runs ``grad_buffer.finish_grad_sync()`` (and any clipping via
    ``grad_norm_sq_local`` / ``scale_grads``) before ``step``.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], grad_buffer: GradBuffer,
                 dp_group, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 no_decay: Callable[[str, nn.Parameter], bool] | None = None) -> None:
        self.grad_buffer = grad_buffer
        self.dp_group = dp_group
        self.dp_size = comm.group_size(dp_group)
        if self.dp_size != grad_buffer.dp_size:
            raise ValueError("DistributedOptimizer: dp_group differs from the GradBuffer's")
        if self.dp_size > 1 and not grad_buffer.reduce_scatter:
            raise ValueError("DistributedOptimizer needs a GradBuffer built with "
                             "reduce_scatter=True (buckets padded to split evenly over dp)")
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        no_decay = no_decay or (lambda name, p: p.ndim < 2)

        buf = grad_buffer
        wanted = {id(p) for _, p in named_params if p.requires_grad}
        if wanted != set(buf.param_range):
            raise ValueError("DistributedOptimizer: named_params differ from the GradBuffer's")
        self.params = buf.params
        self.names = buf.names

        # Full fp32 parameter buffer in the grad buffer's layout (padding stays 0).
        self.param_buffer = torch.zeros_like(buf.buffer)
        decay_full = torch.zeros(buf.numel, dtype=torch.bool, device=buf.buffer.device)
        for p in self.params:
            start, n = buf.param_range[id(p)]
            view = self.param_buffer[start:start + n]
            view.copy_(p.detach().reshape(-1))
            decay_full[start:start + n] = not no_decay(self.names[id(p)], p)
            if p.dtype == torch.float32:
                p.data = view.view_as(p)

        # This rank's shard: one [lo, hi) per bucket, concatenated for the state.
        self.ranges = [buf.shard_range(b) for b in buf.buckets]
        self.shard_numel = sum(hi - lo for lo, hi in self.ranges)
        self.decay_mask = torch.cat([decay_full[lo:hi] for lo, hi in self.ranges])
        self.exp_avg = torch.zeros(self.shard_numel, dtype=torch.float32,
                                   device=buf.buffer.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.step_count = 0

    # -- gradient access for clipping -------------------------------------

    def _local_slices(self) -> list[tuple[int, int, int]]:
        """``(lo, hi, offset into the concatenated shard)`` per bucket."""
        out, off = [], 0
        for lo, hi in self.ranges:
            out.append((lo, hi, off))
            off += hi - lo
        return out

    def local_grad_shard(self) -> torch.Tensor:
        """This rank's averaged fp32 gradient slice (a copy, concatenated over buckets)."""
        g = self.grad_buffer.buffer
        return torch.cat([g[lo:hi] for lo, hi in self.ranges])

    def grad_norm_sq_local(self) -> float:
        """Sum of squares over this rank's shard; the caller sums it over dp for the norm."""
        g = self.grad_buffer.buffer
        return float(sum(g[lo:hi].double().pow(2).sum().item() for lo, hi in self.ranges))

    def scale_grads(self, factor: float) -> None:
        """Scale this rank's gradient shard in place (gradient clipping)."""
        g = self.grad_buffer.buffer
        for lo, hi in self.ranges:
            g[lo:hi].mul_(factor)

    # -- update ------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        """Update this rank's shard, then all-gather so every rank holds the new weights."""
        lr = self.lr if lr is None else lr
        self.lr = lr
        beta1, beta2 = self.betas
        self.step_count += 1
        bc1 = 1 - beta1 ** self.step_count
        bc2_sqrt = (1 - beta2 ** self.step_count) ** 0.5
        step_size = lr / bc1
        decay = 1 - lr * self.weight_decay
        g_full = self.grad_buffer.buffer
        works = []
        for bucket, (lo, hi, off) in zip(self.grad_buffer.buckets, self._local_slices(),
                                         strict=True):
            p = self.param_buffer[lo:hi]
            g = g_full[lo:hi]
            m = self.exp_avg[off:off + hi - lo]
            v = self.exp_avg_sq[off:off + hi - lo]
            if self.weight_decay != 0.0:
                # Decoupled weight decay, only where the mask says so.
                p.copy_(torch.where(self.decay_mask[off:off + hi - lo], p * decay, p))
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)
            # Gather from a copy: the shard is also part of the output range.
            works.append(comm.all_gather_into(
                self.param_buffer[bucket.start:bucket.end], p.clone(), self.dp_group, "dp",
                async_op=True))
        for w in works:
            comm.wait(w, "the ZeRO-1 parameter all-gather", self.dp_group, "dp")
        self._copy_back()

    def _copy_back(self) -> None:
        buf = self.grad_buffer
        for p in self.params:
            start, n = buf.param_range[id(p)]
            view = self.param_buffer[start:start + n]
            if p.data.data_ptr() != view.data_ptr():
                p.data.copy_(view.view_as(p))

    @torch.no_grad()
    def reload_params(self) -> None:
        """Refresh the fp32 master copy from the model (after loading weights into it)."""
        buf = self.grad_buffer
        for p in self.params:
            start, n = buf.param_range[id(p)]
            view = self.param_buffer[start:start + n]
            if p.data.data_ptr() != view.data_ptr():
                view.copy_(p.detach().reshape(-1))

    # -- checkpoint state --------------------------------------------------

    def _gather_full(self, shard: torch.Tensor) -> torch.Tensor:
        full = torch.zeros_like(self.grad_buffer.buffer)
        for bucket, (lo, hi, off) in zip(self.grad_buffer.buckets, self._local_slices(),
                                         strict=True):
            comm.all_gather_into(full[bucket.start:bucket.end],
                                 shard[off:off + hi - lo].contiguous(), self.dp_group, "dp")
        return full

    def state_by_name(self) -> dict[str, torch.Tensor]:
        """Full per-parameter ``exp_avg``/``exp_avg_sq``/``step``, the plain optimizer's format.

        A collective: every dp rank must call it. Moments are fp32 whatever the
        parameter dtype (they are the master state).
        """
        full_m = self._gather_full(self.exp_avg)
        full_v = self._gather_full(self.exp_avg_sq)
        out: dict[str, torch.Tensor] = {}
        for p in self.params:
            name = self.names[id(p)]
            start, n = self.grad_buffer.param_range[id(p)]
            out[f"{name}.step"] = torch.tensor(float(self.step_count), dtype=torch.float32)
            out[f"{name}.exp_avg"] = full_m[start:start + n].view(p.shape).clone()
            out[f"{name}.exp_avg_sq"] = full_v[start:start + n].view(p.shape).clone()
        return out

    def state_slices(self) -> dict[str, torch.Tensor | list[FlatSlice]]:
        """This rank's state with no communication: per parameter its ``step`` and, for
        each moment, the slices of it this rank owns (views: a load fills them in place).
        A parameter with no element in this rank's shard gets no moment entries."""
        out: dict[str, torch.Tensor | list[FlatSlice]] = {}
        for p in self.params:
            name = self.names[id(p)]
            start, n = self.grad_buffer.param_range[id(p)]
            out[f"{name}.step"] = torch.tensor(float(self.step_count), dtype=torch.float32)
            for key, shard in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                slices = [FlatSlice(p.shape, a - start, shard[off + a - lo:off + b - lo])
                          for lo, hi, off in self._local_slices()
                          for a, b in [(max(lo, start), min(hi, start + n))] if a < b]
                if slices:
                    out[f"{name}.{key}"] = slices
        return out

    def load_state_slices(self, state: dict[str, torch.Tensor | list[FlatSlice]]) -> None:
        """After a checkpoint filled ``state_slices()``'s views in place: take the step."""
        steps = {int(t.item()) for k, t in state.items() if k.endswith(".step")}
        if len(steps) != 1:
            raise ValueError(f"load_state_slices: parameters disagree on step: {sorted(steps)}")
        self.step_count = steps.pop()

    def load_state_by_name(self, state: dict[str, torch.Tensor]) -> None:
        """Take full per-parameter tensors and keep this rank's shard (no communication)."""
        full_m = torch.zeros_like(self.grad_buffer.buffer)
        full_v = torch.zeros_like(full_m)
        steps = set()
        for p in self.params:
            name = self.names[id(p)]
            start, n = self.grad_buffer.param_range[id(p)]
            full_m[start:start + n] = state[f"{name}.exp_avg"].reshape(-1)
            full_v[start:start + n] = state[f"{name}.exp_avg_sq"].reshape(-1)
            steps.add(int(state[f"{name}.step"].item()))
        if len(steps) != 1:
            raise ValueError(f"load_state_by_name: parameters disagree on step: {sorted(steps)}")
        self.step_count = steps.pop()
        self.exp_avg.copy_(torch.cat([full_m[lo:hi] for lo, hi in self.ranges]))
        self.exp_avg_sq.copy_(torch.cat([full_v[lo:hi] for lo, hi in self.ranges]))
