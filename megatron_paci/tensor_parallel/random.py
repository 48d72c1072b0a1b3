"""Named RNG streams for dropout inside and outside the tensor-parallel region.

Outside the tp region the activations are replicated over tp ranks, so their
dropout masks must agree: the default RNG is seeded identically on every tp
rank. Inside it (attention probabilities of this rank's heads, a sequence
chunk under SP) each rank owns different data and must draw different masks:
``with tracker.fork():`` swaps in a per-tp-rank stream and swaps the default
one back afterwards, untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

TP_RNG = "tensor-parallel-rng"
_CPU, _CUDA = "cpu", "cuda"


def _cuda() -> bool:
    return torch.cuda.is_available()


class RNGTracker:
    """Holds named generator states (CPU, plus the current CUDA device when present)."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: dict[str, int] = {}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed``; the default RNG is not touched."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        for other, s in self._seeds.items():
            if s == seed:
                raise ValueError(f"seed {seed} for {name!r} is already used by {other!r}")
        states = {_CPU: torch.Generator().manual_seed(seed).get_state()}
        if _cuda():
            saved = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            states[_CUDA] = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(saved)
        self._states[name] = states
        self._seeds[name] = seed

    def names(self) -> list[str]:
        return list(self._states)

    @contextmanager
    def fork(self, name: str = TP_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; it keeps its advance afterwards."""
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was never added (known: {self.names()})")
        states = self._states[name]
        saved_cpu = torch.get_rng_state()
        use_cuda = _CUDA in states and _cuda()
        saved_cuda = torch.cuda.get_rng_state() if use_cuda else None
        torch.set_rng_state(states[_CPU])
        if use_cuda:
            torch.cuda.set_rng_state(states[_CUDA])
        try:
            yield
        finally:
            states[_CPU] = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if use_cuda:
                states[_CUDA] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<name>/cpu": uint8 tensor, "<name>/cuda": ...}`` for a checkpoint's tensors."""
        return {f"{name}/{dev}": t.clone()
                for name, states in self._states.items() for dev, t in states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore what ``get_states`` returned (streams not yet added are created)."""
        for key, t in states.items():
            name, sep, dev = key.rpartition("/")
            if not sep or dev not in (_CPU, _CUDA):
                raise ValueError(f"unexpected RNG state key {key!r}")
            self._states.setdefault(name, {})[dev] = t.clone()


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0) -> RNGTracker:
    """Seed the default RNG and return a tracker with the per-tp-rank stream (Megatron's scheme).

    Default RNG: ``seed + 100 * pp_rank``, identical on all tp ranks, so dropout
    outside the tp region agrees across them. ``"tensor-parallel-rng"``:
    ``seed + 100 * pp_rank + 2718 + tp_rank``, different per tp rank (and, as in
    Megatron, per pipeline stage).
    """
    stage_seed = seed + 100 * pp_rank
    torch.manual_seed(stage_seed)
    tracker = RNGTracker()
    tracker.add(TP_RNG, stage_seed + 2718 + tp_rank)
    return tracker
