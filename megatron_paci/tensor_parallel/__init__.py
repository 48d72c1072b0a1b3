"""Tensor parallelism: sharded layers, the mappings between regions, vocab-parallel loss, RNG."""

from megatron_paci.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_paci.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallel_lm_logits,
    set_tp_attributes,
    shard_of,
)
from megatron_paci.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megatron_paci.tensor_parallel.random import TP_RNG, RNGTracker, model_parallel_seed

__all__ = [
    "TP_RNG",
    "ColumnParallelLinear",
    "RNGTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "model_parallel_seed",
    "parallel_lm_logits",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
    "set_tp_attributes",
    "shard_of",
    "vocab_parallel_cross_entropy",
]
