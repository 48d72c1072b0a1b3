"""Data-parallel gradient sync: fp32 ``main_grad`` in one flat buffer, bucketed and overlapped.

Why this shape (Megatron's DDP):

- Gradients accumulate across micro-batches in fp32 even when the parameters are
  bf16, so many small bf16 additions do not lose the low bits.
- One contiguous buffer lets a bucket be reduced with one collective instead of
  one per parameter.
- Buckets are laid out in the order gradients become ready in backward (the
  reverse of registration), so the last layers' bucket can start its all-reduce
  while autograd is still computing the first layers' gradients.

An fp32 parameter's ``.grad`` *is* its ``main_grad`` view: autograd then adds each
micro-batch's gradient into the buffer itself, in place, with no Python hook per
parameter per backward (about a tenth of a small model's step on CPU). A hook stays
where it has work: a bf16 parameter's gradient is added into its fp32 view, and, with
dp > 1 and overlap, a hook counts arrivals to launch a bucket once it is full.

With ``reduce_scatter=True`` each bucket is reduce-scattered instead, so a dp
rank ends with only its 1/dp slice of every bucket reduced (what the ZeRO-1
optimizer in ``distributed_optimizer.py`` consumes); the rest of the buffer then
holds this rank's un-reduced local gradients and must not be read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_paci.parallel import comm


@dataclass
class Bucket:
    """A contiguous ``[start, end)`` range of the flat buffer reduced by one collective."""

    index: int
    start: int
    end: int
    params: list[nn.Parameter] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    ready: set[int] = field(default_factory=set)  # id(param) whose hook fired this pass
    handle: object | None = None
    scattered: torch.Tensor | None = None  # reduce-scatter output, until copied back
    launched: bool = False

    @property
    def numel(self) -> int:
        return self.end - self.start


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class GradBuffer:
    """Owns ``param.main_grad`` for every trainable parameter and reduces it over dp.

    Usage per optimizer step::

        buf.zero_grad()
        for i, mb in enumerate(micro_batches):
            with buf.no_sync() if i < len(micro_batches) - 1 else nullcontext():
                loss(mb).backward()
        buf.finish_grad_sync()   # main_grad = mean over dp ranks
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], dp_group=None,
                 bucket_size_bytes: int = 40_000_000 * 4, overlap: bool = True,
                 reduce_scatter: bool = False) -> None:
        self.dp_group = dp_group
        self.dp_size = comm.group_size(dp_group)
        self.dp_rank = comm.group_rank(dp_group)
        self.overlap = overlap
        self.reduce_scatter = reduce_scatter
        self.sync_enabled = True

        # Trainable params once each (tied weights keep their first name).
        seen: set[int] = set()
        unique: list[tuple[str, nn.Parameter]] = []
        for name, p in named_params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                unique.append((name, p))
        if not unique:
            raise ValueError("GradBuffer: no parameter requires grad")

        # Reverse order = the order grads become ready in backward.
        elem_bytes = 4
        self.buckets: list[Bucket] = []
        self.param_range: dict[int, tuple[int, int]] = {}  # id(param) -> (start, numel)
        self.names: dict[int, str] = {}
        offset = 0
        current = Bucket(index=0, start=0, end=0)
        for i, (name, p) in enumerate(reversed(unique)):
            self.param_range[id(p)] = (offset, p.numel())
            self.names[id(p)] = name
            current.params.append(p)
            current.names.append(name)
            offset += p.numel()
            last = i == len(unique) - 1
            if last or (offset - current.start) * elem_bytes >= bucket_size_bytes:
                # Pad so a reduce-scatter splits the bucket evenly (and the
                # buffer always divides by dp, for any sharding built on it).
                if reduce_scatter or last:
                    offset = _round_up(offset, self.dp_size)
                current.end = offset
                self.buckets.append(current)
                current = Bucket(index=len(self.buckets), start=offset, end=offset)
        self.numel = offset
        self.buffer = torch.zeros(self.numel, dtype=torch.float32,
                                  device=unique[0][1].device)
        self.params: list[nn.Parameter] = [p for _, p in unique]
        self._bucket_of: dict[int, Bucket] = {}
        for b in self.buckets:
            for p in b.params:
                self._bucket_of[id(p)] = b
                start, n = self.param_range[id(p)]
                p.main_grad = self.buffer[start:start + n].view_as(p)

        self.launch_log: list[tuple[int, int]] = []  # (bucket index, hooks fired so far)
        self._hooks_fired = 0
        # fp32: autograd accumulates into the buffer view (``.grad`` aliases it).
        self.aliased = [p for p in self.params if p.dtype == torch.float32]
        for p in self.aliased:
            p.grad = p.main_grad
        counting = self.overlap and self.dp_size > 1
        self._handles = []
        for p in self.params:
            if p.dtype != torch.float32:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
            elif counting:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_added))

    # -- hooks -------------------------------------------------------------

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        grad, p.grad = p.grad, None
        self.accumulate(p, grad)

    def _on_grad_added(self, p: torch.Tensor) -> None:
        # autograd already added the gradient into main_grad (p.grad is its view)
        self.accumulate(p, None)

    def accumulate(self, p: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Fold ``grad`` of parameter ``p`` into fp32 ``main_grad``; launch its bucket
        once the bucket is full. Public so that gradients computed against another
        copy of the weights (PipeDream-2BW's stashed versions) land in the same place."""
        bucket = self._bucket_of[id(p)]
        if bucket.launched:
            raise RuntimeError(
                f"gradient of {self.names[id(p)]} arrived after its bucket {bucket.index} was "
                "launched; call finish_grad_sync() and zero_grad() before another backward")
        if grad is not None:
            p.main_grad.add_(grad)  # type promotion: bf16 grad -> fp32 accumulator
        if not self.sync_enabled:
            return
        self._hooks_fired += 1
        bucket.ready.add(id(p))
        if self.overlap and len(bucket.ready) == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        self.launch_log.append((bucket.index, self._hooks_fired))
        bucket.launched = True
        if self.dp_size == 1:
            return
        view = self.buffer[bucket.start:bucket.end]
        if self.reduce_scatter:
            bucket.scattered, bucket.handle = comm.reduce_scatter(
                view, self.dp_group, "dp", async_op=True)
        else:
            bucket.handle = comm.all_reduce(view, self.dp_group, "dp", async_op=True)

    # -- public API --------------------------------------------------------

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate only (non-last micro-batches): no bucket is launched inside."""
        previous = self.sync_enabled
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """Buffer range ``[lo, hi)`` of this dp rank's slice of ``bucket`` (reduce_scatter)."""
        k = bucket.numel // self.dp_size
        lo = bucket.start + self.dp_rank * k
        return lo, lo + k

    def finish_grad_sync(self) -> None:
        """Launch buckets whose hooks did not all fire (unused params), wait, average over dp.

        Every rank must reach this with the same set of buckets launched in the
        same order, which holds when all ranks run the same model.
        """
        self._check_aliases()
        for bucket in self.buckets:
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            comm.wait(bucket.handle, "the gradient reduction", self.dp_group, "dp")
            if self.dp_size > 1:
                if self.reduce_scatter:
                    lo, hi = self.shard_range(bucket)
                    self.buffer[lo:hi].copy_(bucket.scattered).div_(self.dp_size)
                else:
                    self.buffer[bucket.start:bucket.end].div_(self.dp_size)
            self._reset(bucket)
        self._hooks_fired = 0

    def zero_grad(self) -> None:
        """Zero every ``main_grad`` and forget which hooks fired."""
        for bucket in self.buckets:
            # Never zero under an in-flight collective.
            comm.wait(bucket.handle, "the gradient reduction", self.dp_group, "dp")
            self._reset(bucket)
        self.buffer.zero_()
        self._hooks_fired = 0
        self.launch_log.clear()

    def _check_aliases(self) -> None:
        """autograd adds in place into an existing ``.grad`` (outside create_graph); if
        anything rebound one, its gradients went elsewhere: fail rather than step on
        a partial sum."""
        for p in self.aliased:
            if p.grad is not p.main_grad:
                raise RuntimeError(
                    f"{self.names[id(p)]}.grad no longer aliases its main_grad (it was set to "
                    "None or replaced, e.g. by zero_grad(set_to_none=True) or a double "
                    "backward): its gradients did not reach the gradient buffer")

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _reset(bucket: Bucket) -> None:
        bucket.ready.clear()
        bucket.handle = None
        bucket.scattered = None
        bucket.launched = False


DataParallelGradSync = GradBuffer
