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
