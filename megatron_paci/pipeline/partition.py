"""Which layers each pipeline stage owns: even, by hand, or balanced by cost (``auto``)."""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class PartCosts:
    """Cost per token of one transformer layer, of what stage 0 holds besides its layers
    (the embedding) and of what the last stage holds besides its (final norm, output
    layer, loss). Any unit: only ratios matter. training/flops.py gives FLOPs."""

    layer: float
    embedding: float = 0.0
    head: float = 0.0


# For checks of a split's validity, which does not depend on the costs.
UNIT_COSTS = PartCosts(1.0)


def stage_costs(sizes: list[int], costs: PartCosts) -> list[float]:
    """Cost of each (virtual) stage holding ``sizes[i]`` layers, the first with the
    embedding and the last with the head."""
    out = [n * costs.layer for n in sizes]
    out[0] += costs.embedding
    out[-1] += costs.head
    return out


def balanced_split(num_layers: int, stages: int, costs: PartCosts) -> list[int]:
    """Layers per stage, every stage at least one, minimising the costliest stage.

    Ties are broken by the next costliest, and so on (the sorted costs compared
    lexicographically), then by giving the extra layers to the later stages: under 1F1B
    a later stage keeps fewer micro-batches in flight, so its layers cost less memory.

    The layers all cost the same, so only the first and last stage's counts matter: the
    stages between are best as even as possible (an even split is majorised by every
    other with the same sum), smaller counts first. Every (first, last) pair is tried.
    """
    _check_stages(num_layers, stages)
    if stages == 1:
        return [num_layers]
    middle = stages - 2
    best: tuple | None = None
    for first in range(1, num_layers - middle):
        for last in range(1, num_layers - middle - first + 1):
            rest = num_layers - first - last
            if (middle == 0) != (rest == 0):
                continue
            base, extra = divmod(rest, middle) if middle else (0, 0)
            sizes = ([first] + [base] * (middle - extra) + [base + 1] * extra + [last])
            key = (sorted(stage_costs(sizes, costs), reverse=True), sizes)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[1]


def max_over_mean(sizes: list[int], costs: PartCosts) -> float:
    """The costliest stage over the mean stage: what the pipeline loses to imbalance."""
    c = stage_costs(sizes, costs)
    return max(c) * len(c) / sum(c)


def describe_split(sizes: list[int], costs: PartCosts) -> str:
    """``[3, 3, 4, 1] layers, cost / mean 0.93 0.93 1.24 0.89 (max/mean 1.24)``."""
    c = stage_costs(sizes, costs)
    mean = sum(c) / len(c)
    return (f"{sizes} layers, cost / mean " + " ".join(f"{x / mean:.2f}" for x in c)
            + f" (max/mean {max_over_mean(sizes, costs):.2f})")


def _check_stages(num_layers: int, stages: int) -> None:
    if stages > num_layers:
        raise ValueError(f"parallel.pipeline={stages} is larger than model.num_layers="
                         f"{num_layers}: every stage needs at least one layer")


def resolve_sizes(num_layers: int, stages: int, layers_per_stage: list[int] | str | None,
                  costs: PartCosts | None = None) -> list[int]:
    """Layers per stage for ``pipeline.layers_per_stage`` (None: even; a remainder goes to
    the earliest stages, since the last stage also carries the final norm, the output
    layer and the loss; ``auto``: ``balanced_split`` on ``costs``)."""
    _check_stages(num_layers, stages)
    if layers_per_stage is None:
        base, extra = divmod(num_layers, stages)
        return [base + (1 if s < extra else 0) for s in range(stages)]
    if isinstance(layers_per_stage, str):
        if layers_per_stage != AUTO:
            raise ValueError(f"pipeline.layers_per_stage={layers_per_stage!r}: expected a "
                             f"list of layer counts, '{AUTO}' or null")
        if costs is None:
            raise ValueError(f"pipeline.layers_per_stage={AUTO} needs the parts' costs "
                             "(PartCosts); none were given")
        return balanced_split(num_layers, stages, costs)
    if len(layers_per_stage) != stages:
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage} has "
                         f"{len(layers_per_stage)} entries, parallel.pipeline={stages}")
    if any(n < 1 for n in layers_per_stage):
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage}: every stage needs "
                         "at least one layer")
    if sum(layers_per_stage) != num_layers:
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage} covers "
                         f"{sum(layers_per_stage)} layers, model.num_layers={num_layers}")
    return list(layers_per_stage)


def partition_layers(num_layers: int, stages: int,
                     layers_per_stage: list[int] | str | None = None,
                     costs: PartCosts | None = None) -> list[tuple[int, int]]:
    """``[first, last)`` layer range per stage; every layer exactly once."""
    ranges, first = [], 0
    for n in resolve_sizes(num_layers, stages, layers_per_stage, costs):
        ranges.append((first, first + n))
        first += n
    return ranges


def chunk_layers(num_layers: int, stages: int, chunks: int = 1,
                 layers_per_stage: list[int] | str | None = None,
                 costs: PartCosts | None = None) -> list[list[tuple[int, int]]]:
    """Per rank, the layer ranges of its model chunks, in chunk order.

    With ``chunks = v > 1`` the layers are cut into ``P*v`` virtual stages and handed out
    round-robin, as Megatron's virtual pipeline does: rank s holds virtual stages
    s, P+s, 2P+s, ... Megatron's rule applies: P*v must divide the layers evenly, unless
    ``pipeline.layers_per_stage`` gives all P*v virtual stages' sizes, or is ``auto``,
    which balances the P*v virtual stages (each chunk's forward and backward is one unit
    of the interleaved schedule, so the costliest virtual stage paces it).
    """
    if chunks < 1:
        raise ValueError(f"parallel.virtual_pipeline must be >= 1, got {chunks}")
    if chunks == 1:
        return [[r] for r in partition_layers(num_layers, stages, layers_per_stage, costs)]
    virtual = stages * chunks
    if layers_per_stage is None and num_layers % virtual:
        raise ValueError(f"model.num_layers={num_layers} is not divisible by parallel.pipeline"
                         f" x parallel.virtual_pipeline = {stages} x {chunks} = {virtual}: "
                         "interleaving gives every virtual stage the same number of layers")
    if isinstance(layers_per_stage, list) and len(layers_per_stage) != virtual:
        raise ValueError(f"pipeline.layers_per_stage={layers_per_stage} has "
                         f"{len(layers_per_stage)} entries; with parallel.virtual_pipeline="
                         f"{chunks} it needs one per virtual stage, {virtual}")
    if layers_per_stage == AUTO and virtual > num_layers:
        raise ValueError(f"pipeline.layers_per_stage={AUTO}: parallel.pipeline x "
                         f"parallel.virtual_pipeline = {stages} x {chunks} = {virtual} virtual "
                         f"stages, more than model.num_layers={num_layers}: every virtual "
                         "stage needs at least one layer")
    ranges = partition_layers(num_layers, virtual, layers_per_stage, costs)
    return [[ranges[c * stages + s] for c in range(chunks)] for s in range(stages)]
