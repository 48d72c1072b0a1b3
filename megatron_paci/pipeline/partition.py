"""Which layers each pipeline stage owns."""

from __future__ import annotations


def partition_layers(num_layers: int, stages: int,
                     layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """``[first, last)`` layer range per stage; every layer exactly once.

    Even by default; a remainder goes to the earliest stages, since the last
    stage also carries the final norm, the output layer and the loss.
    """
    if stages > num_layers:
        raise ValueError(f"parallel.pipeline={stages} is larger than model.num_layers="
                         f"{num_layers}: every stage needs at least one layer")
    if layers_per_stage is None:
        base, extra = divmod(num_layers, stages)
        layers_per_stage = [base + (1 if s < extra else 0) for s in range(stages)]
    if len(layers_per_stage) != stages:
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage} has "
                         f"{len(layers_per_stage)} entries, parallel.pipeline={stages}")
    if any(n < 1 for n in layers_per_stage):
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage}: every stage needs "
                         "at least one layer")
    if sum(layers_per_stage) != num_layers:
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage} covers "
                         f"{sum(layers_per_stage)} layers, model.num_layers={num_layers}")
    ranges, first = [], 0
    for n in layers_per_stage:
        ranges.append((first, first + n))
        first += n
    return ranges


def chunk_layers(num_layers: int, stages: int, chunks: int = 1,
                 layers_per_stage: list[int] | None = None) -> list[list[tuple[int, int]]]:
    """Per rank, the layer ranges of its model chunks, in chunk order.

    With ``chunks = v > 1`` the layers are cut into ``P*v`` virtual stages and handed out
    round-robin, as Megatron's virtual pipeline does: rank s holds virtual stages
    s, P+s, 2P+s, ... Megatron's rule applies: P*v must divide the layers evenly, unless
    ``pipeline.layers_per_stage`` gives all P*v virtual stages' sizes.
    """
    if chunks < 1:
        raise ValueError(f"parallel.virtual_pipeline must be >= 1, got {chunks}")
    if chunks == 1:
        return [[r] for r in partition_layers(num_layers, stages, layers_per_stage)]
    virtual = stages * chunks
    if layers_per_stage is None and num_layers % virtual:
        raise ValueError(f"model.num_layers={num_layers} is not divisible by parallel.pipeline"
                         f" x parallel.virtual_pipeline = {stages} x {chunks} = {virtual}: "
                         "interleaving gives every virtual stage the same number of layers")
    if layers_per_stage is not None and len(layers_per_stage) != virtual:
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage} has "
                         f"{len(layers_per_stage)} entries; with parallel.virtual_pipeline="
                         f"{chunks} it needs one per virtual stage, {virtual}")
    ranges = partition_layers(num_layers, virtual, layers_per_stage)
    return [[ranges[c * stages + s] for c in range(chunks)] for s in range(stages)]
