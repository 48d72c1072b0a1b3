"""Orders of forwards and backwards on one rank, before any STEP is placed.

Schedules (schedules.py) are built from these: 1F1B for one model chunk per rank, and
Megatron's interleaved 1F1B for several chunks per rank (virtual pipeline stages).
"""

from __future__ import annotations

from megatron_paci.pipeline.actions import Action, B, F


def check_stage(stages: int, stage: int) -> None:
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} out of range for {stages} stages (0..{stages - 1})")


def one_f_one_b(stages: int, stage: int, num_microbatches: int, first: int = 1) -> list[Action]:
    """1F1B order for micro-batches ``first .. first+N-1`` on one stage.

    Warm-up of ``min(P-s-1, N)`` forwards fills the pipe below this stage, then (F, B) pairs
    keep at most ``P-s`` micro-batches in flight, then the cool-down drains the backwards.
    """
    check_stage(stages, stage)
    if num_microbatches < 0:
        raise ValueError(f"num_microbatches must be >= 0, got {num_microbatches}")
    if first < 1:
        raise ValueError(f"first micro-batch must be >= 1, got {first}")
    n = num_microbatches
    warm = min(stages - stage - 1, n)
    actions = [F(first + i) for i in range(warm)]
    for i in range(n - warm):
        actions += [F(first + warm + i), B(first + i)]
    actions += [B(first + i) for i in range(n - warm, n)]
    return actions


def interleaving_problem(stages: int, chunks: int, num_microbatches: int) -> str | None:
    """Why Megatron's interleaved order cannot run this size, or None."""
    if chunks < 2:
        return None
    if stages < 2:
        return (f"interleaving needs parallel.pipeline >= 2 (got {stages}): with one rank "
                "there is no pipeline to interleave")
    if num_microbatches % stages:
        return (f"interleaved 1F1B needs the micro-batches per window ({num_microbatches}) "
                f"to be a multiple of parallel.pipeline={stages} (Megatron's rule: it "
                "forwards micro-batches through each chunk in groups of P)")
    return None


def interleaved_one_f_one_b(stages: int, stage: int, chunks: int, num_microbatches: int,
                            first: int = 1) -> list[Action]:
    """Megatron's interleaved 1F1B for one window on rank ``stage`` holding ``chunks``.

    Virtual micro-batch ``k`` (0-based, ``chunks * N`` of them) forwards micro-batch
    ``(k // (P*v)) * P + k % P`` through chunk ``(k % (P*v)) // P``; backwards visit the
    chunks in reverse. Rank s warms up with ``2(P-s-1) + (v-1)P`` forwards (all of them
    when N == P), then alternates one forward and one backward, then cools down.
    """
    check_stage(stages, stage)
    problem = interleaving_problem(stages, chunks, num_microbatches)
    if problem:
        raise ValueError(problem)
    if chunks == 1:
        return one_f_one_b(stages, stage, num_microbatches, first)
    p, v, n = stages, chunks, num_microbatches
    total = n * v
    if n == p:
        warm = total
    else:
        warm = min(2 * (p - stage - 1) + (v - 1) * p, total)

    def microbatch(k: int) -> int:
        return first + (k // (p * v)) * p + k % p

    def forward(k: int) -> Action:
        return F(microbatch(k), (k % (p * v)) // p)

    def backward(k: int) -> Action:
        return B(microbatch(k), v - 1 - (k % (p * v)) // p)

    actions = [forward(k) for k in range(warm)]
    for i in range(total - warm):
        actions += [forward(warm + i), backward(i)]
    actions += [backward(k) for k in range(total - warm, total)]
    return actions
