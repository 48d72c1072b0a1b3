"""Column/row-parallel linears and the vocab-parallel embedding (Megatron's layers).

Parameters are created as zeros: the model builds every FULL tensor from a
seeded generator and copies ``shard_of(full, p.tensor_parallel_dim, rank, size)``
into each shard, so tp=2 starts from the tp=1 weights. Creating them without
drawing random numbers also leaves the default RNG in the same state whatever
the tp size, so dropout outside the tp region does not depend on it.

With ``group=None`` every layer computes exactly the plain torch op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_paci.parallel import comm
from megatron_paci.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)


def set_tp_attributes(param: torch.Tensor, dim: int | None,
                      sequence_parallel: bool = False) -> torch.Tensor:
    """Tag a parameter for init, checkpointing and grad sync.

    ``dim``: the partition dim of the full tensor this is a shard of (None when
    replicated). ``sequence_parallel``: a replicated parameter whose gradient is
    partial per tp rank under sequence parallelism and must be summed over tp.
    """
    param.tensor_parallel_dim = dim
    param.sequence_parallel = bool(sequence_parallel)
    return param


def shard_of(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous 1/``size`` chunk of ``full`` along ``dim`` (all of it if None)."""
    if dim is None or size == 1:
        return full
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of size {size}")
    length = full.shape[dim]
    if length % size:
        raise ValueError(f"cannot shard a tensor of shape {tuple(full.shape)} along dim {dim}: "
                         f"{length} is not divisible by tensor-parallel size {size}")
    step = length // size
    return full.narrow(dim, rank * step, step).contiguous()


def _divide(total: int, parts: int, layer: str, what: str) -> int:
    if total % parts:
        raise ValueError(f"{layer}: {what}={total} is not divisible by tensor-parallel "
                         f"size {parts}")
    return total // parts


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split by rows (output features) over tp ranks.

    Output is this rank's slice of the features (``[s, b, out/tp]``), or the
    full features with ``gather_output``. Under sequence parallelism the input
    is the rank's sequence chunk and is all-gathered first.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 skip_bias_add: bool = False):
        super().__init__()
        # skip_bias_add: the caller adds ``self.bias``, fused with what follows.
        self.skip_bias_add = skip_bias_add
        self.group = group
        self.tp_size = comm.group_size(group)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.out_per_rank = _divide(out_features, self.tp_size,
                                    f"ColumnParallelLinear({in_features}, {out_features})",
                                    "out_features")
        self.weight = nn.Parameter(torch.zeros(self.out_per_rank, in_features))
        set_tp_attributes(self.weight, 0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank))
            set_tp_attributes(self.bias, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` overrides ``self.weight`` (a tied head passes the embedding's shard)."""
        w = self.weight if weight is None else weight
        if w.shape != (self.out_per_rank, self.in_features):
            raise ValueError(f"ColumnParallelLinear: weight shape {tuple(w.shape)}, expected "
                             f"{(self.out_per_rank, self.in_features)}")
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        else:
            x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, w, None if self.skip_bias_add else self.bias)
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.group)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tp={self.tp_size}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split by columns (input features) over tp ranks.

    Partial products are summed over tp (or reduce-scattered along the
    sequence under sequence parallelism) before the replicated bias is added
    once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 skip_bias_add: bool = False):
        super().__init__()
        # skip_bias_add: the caller adds ``self.bias``, fused with what follows.
        self.skip_bias_add = skip_bias_add
        self.group = group
        self.tp_size = comm.group_size(group)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        name = f"RowParallelLinear({in_features}, {out_features})"
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError(f"{name}: sequence_parallel requires input_is_parallel=True")
        self.in_per_rank = _divide(in_features, self.tp_size, name, "in_features")
        self.weight = nn.Parameter(torch.zeros(out_features, self.in_per_rank))
        set_tp_attributes(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            set_tp_attributes(self.bias, None, sequence_parallel=self.sequence_parallel)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)
        if self.tp_size == 1:  # nothing to sum: the GEMM adds the bias (addmm)
            return F.linear(x, self.weight, None if self.skip_bias_add else self.bias)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tensor_parallel_region(y, self.group)
        return y if self.bias is None or self.skip_bias_add else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tp={self.tp_size}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it owns.

    Ids outside this rank's range contribute zeros, so the sum over tp (or the
    reduce-scatter along the sequence under sequence parallelism) is the full
    lookup. ``[s, b]`` ids give ``[s, b, dim]`` (``[s/tp, b, dim]`` with SP).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.tp_size = comm.group_size(group)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        per_rank = _divide(num_embeddings, self.tp_size,
                           f"VocabParallelEmbedding({num_embeddings}, {embedding_dim})",
                           "num_embeddings")
        self.vocab_start = comm.group_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = nn.Parameter(torch.zeros(per_rank, embedding_dim))
        set_tp_attributes(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group)
        return reduce_from_tensor_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_size}, "
                f"vocab_range=[{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")


def parallel_lm_logits(hidden: torch.Tensor, weight_shard: torch.Tensor, group,
                       sequence_parallel: bool = False,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Output head: ``[s, b, h]`` (``[s/tp, b, h]`` with SP) -> logits shard ``[s, b, V/tp]``.

    The logits stay sharded over the vocabulary; ``vocab_parallel_cross_entropy``
    consumes them without ever building the full ``[s, b, V]`` tensor.
    """
    if sequence_parallel:
        x = gather_from_sequence_parallel_region(hidden, group)
    else:
        x = copy_to_tensor_parallel_region(hidden, group)
    return F.linear(x, weight_shard, bias)
