"""Autograd-aware communication at the edges of a tensor-parallel region.

Each mapping is a pair of conjugate collectives: what the forward does to the
activation, the backward does (transposed) to its gradient. Layers compose
them so a sharded computation has exactly the gradients of the unsharded one.

Activations are ``[seq, batch, hidden]``: tensor parallelism splits the last
dimension, sequence parallelism splits dim 0 (contiguous, so no transposes).
``group=None`` (or any size-1 group) makes every mapping the identity. Every
collective goes through :mod:`megatron_paci.parallel.comm` with ``kind="tp"``
so its bytes are counted.
"""

from __future__ import annotations

import torch

from megatron_paci.parallel import comm

KIND = "tp"


def _trivial(group) -> bool:
    return group is None or comm.group_size(group) == 1


def _my_chunk(x: torch.Tensor, dim: int, group, what: str) -> torch.Tensor:
    """This rank's contiguous 1/n slice of ``x`` along ``dim`` (no communication)."""
    n = comm.group_size(group)
    dim = dim % x.dim()
    size = x.shape[dim]
    if size % n:
        raise ValueError(f"{what}: size {size} along dim {dim} is not divisible by the "
                         f"tensor-parallel group size {n}")
    step = size // n
    return x.narrow(dim, comm.group_rank(group) * step, step).contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # Reduce a contiguous copy: the input may be saved by another op's backward.
    out = torch.clone(x, memory_format=torch.contiguous_format)
    comm.all_reduce(out, group, KIND)
    return out


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    return comm.all_gather(x.contiguous(), group, KIND, dim=x.dim() - 1)


def _gather_first(x: torch.Tensor, group) -> torch.Tensor:
    return comm.all_gather(x.contiguous(), group, KIND, dim=0)


def _reduce_scatter_first(x: torch.Tensor, group, what: str) -> torch.Tensor:
    n = comm.group_size(group)
    if x.shape[0] % n:
        raise ValueError(f"{what}: size {x.shape[0]} along dim 0 is not divisible by the "
                         f"tensor-parallel group size {n}")
    return comm.reduce_scatter(x.contiguous(), group, KIND, dim=0)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _my_chunk(x, -1, group, "scatter_to_tensor_parallel_region")

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _my_chunk(grad, -1, ctx.group, "gather_from_tensor_parallel_region"), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _my_chunk(x, 0, group, "scatter_to_sequence_parallel_region")

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        what = "gather_from_sequence_parallel_region"
        if ctx.tensor_parallel_output_grad:
            # Each rank's consumer produced a partial gradient for the whole sequence.
            return _reduce_scatter_first(grad, ctx.group, what), None, None
        return _my_chunk(grad, 0, ctx.group, what), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group, "reduce_scatter_to_sequence_parallel_region")

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tp region with a replicated input: identity; backward sums the grads."""
    return x if _trivial(group) else _CopyToTP.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tp region by summing partial outputs; backward is the identity."""
    return x if _trivial(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; backward all-gathers the last dim."""
    return x if _trivial(group) else _ScatterToTP.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dim; backward keeps this rank's chunk."""
    return x if _trivial(group) else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the sequence (dim 0); backward all-gathers dim 0."""
    return x if _trivial(group) else _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group,
                                         tensor_parallel_output_grad: bool = True
                                         ) -> torch.Tensor:
    """All-gather the sequence (dim 0).

    Backward reduce-scatters dim 0 when the consumer is tensor-parallel (each
    rank holds a partial gradient of the full sequence); with
    ``tensor_parallel_output_grad=False`` the gradient is already complete and
    replicated, so each rank just keeps its chunk.
    """
    if _trivial(group):
        return x
    return _GatherFromSP.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial outputs and keep this rank's sequence chunk; backward all-gathers dim 0."""
    return x if _trivial(group) else _ReduceScatterToSP.apply(x, group)
