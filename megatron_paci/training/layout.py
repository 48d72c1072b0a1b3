"""Layout checks that need both the config and the world size.

Run on every rank before any process group exists: each rank reaches the same
verdict from the same inputs, so all exit together and none waits in a
collective for a peer that already left.
"""

from __future__ import annotations

from megatron_paci.config.schema import Config
from megatron_paci.parallel.state import ParallelConfigError, check_sizes
from megatron_paci.pipeline.partition import UNIT_COSTS, chunk_layers
from megatron_paci.pipeline.registry import get_schedule
from megatron_paci.pipeline.validate import check_schedule


def _uses_nccl(cfg: Config) -> bool:
    """Whether the pipeline's messages go over NCCL (a CUDA run), as initialize picks."""
    import torch

    return cfg.train.device == "cuda" or (cfg.train.device == "auto"
                                          and torch.cuda.is_available())


def validate_layout(cfg: Config, world: int) -> int:
    """Returns the data-parallel size, or raises ParallelConfigError naming the sizes."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    tp = par.tensor
    dp = check_sizes(world, tp, par.pipeline)
    if tp > m.num_attention_heads:
        raise ParallelConfigError(
            f"parallel.tensor={tp} is larger than model.num_attention_heads="
            f"{m.num_attention_heads}: each tensor-parallel rank needs whole heads")
    if m.num_attention_heads % tp:
        raise ParallelConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor={tp}")
    if m.hidden_size % tp:
        raise ParallelConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by parallel.tensor={tp}")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    if ffn % tp:
        raise ParallelConfigError(
            f"FFN size {ffn} (model.ffn_hidden_size) is not divisible by parallel.tensor={tp}")
    if par.sequence_parallel and tp == 1:
        raise ParallelConfigError(
            "parallel.sequence_parallel=true needs parallel.tensor > 1 (it splits the "
            "sequence across tensor-parallel ranks)")
    if par.sequence_parallel and m.seq_length % tp:
        raise ParallelConfigError(
            f"model.seq_length={m.seq_length} is not divisible by parallel.tensor={tp}, "
            "which sequence parallelism needs")
    try:
        chunk_layers(m.num_layers, par.pipeline, par.virtual_pipeline,
                     cfg.pipeline.layers_per_stage, UNIT_COSTS)  # validity only
    except ValueError as e:
        raise ParallelConfigError(str(e)) from None
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ParallelConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp} "
            f"(world {world} / (tensor {tp} x pipeline {par.pipeline}))")
    try:
        spec = get_schedule(cfg.pipeline.schedule)
    except (ValueError, OSError) as e:
        raise ParallelConfigError(str(e)) from None
    if (par.pipeline > 1 and m.tie_embeddings and spec.tied_embeddings_across_stages
            and cfg.optim.distributed_optimizer):
        raise ParallelConfigError(
            "optim.distributed_optimizer=true cannot keep the embedding tied across pipeline "
            f"stages ({spec.title}, parallel.pipeline={par.pipeline}); set "
            "model.tie_embeddings=false")
    window = t.global_batch_size // (t.micro_batch_size * dp)
    try:
        spec.check(par.pipeline, window, par.virtual_pipeline, cfg.optim.distributed_optimizer)
        # Every rank's list, played against the others: no deadlock, no window cut in
        # half, messages received in the order they are sent.
        check_schedule(spec, par.pipeline, window, par.virtual_pipeline,
                       nccl=_uses_nccl(cfg))
    except ValueError as e:
        msg = str(e)
        prefix = f"pipeline.schedule={cfg.pipeline.schedule}"
        raise ParallelConfigError(msg if msg.startswith(prefix) else f"{prefix}: {msg}") from None
    return dp
