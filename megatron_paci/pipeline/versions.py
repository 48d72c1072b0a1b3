"""Weight-version policies: which weights a forward and its backward see.

The three schedules differ only here and in where STEP sits (schedules.py).

- ``LiveWeights`` (1F1B-flush, PACI): forwards and backwards use the
  parameters as they are at that moment. The optimizer writes through
  ``param.data`` aliases, which do not share the autograd version counter, so a
  backward still pending after a STEP computes its input gradient with the
  live (new) weights and its weight gradient from the activations saved at its
  forward. Under flush no STEP falls between F(j) and B(j), so both see one
  version.
- ``TwoVersionStash`` (PipeDream-2BW): every forward runs on an immutable
  snapshot of the weights (``torch.func.functional_call``), F(j) and B(j) on
  version ``max(0, (j-1)//m - 1)``. A STEP never writes storage that a
  published version uses: the parameter first moves to a copy of its storage,
  and the update lands there; the older storage stays alive exactly as long
  as the stash or an in-flight graph references it. At most two versions exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from megatron_paci.pipeline.actions import Action


def two_bw_version(j: int, window: int) -> int:
    """The stashed version PipeDream-2BW's F(j) and B(j) both use: one-step delayed weights."""
    if j < 1 or window < 1:
        raise ValueError(f"need j >= 1 and window >= 1, got j={j}, window={window}")
    return max(0, (j - 1) // window - 1)


VersionTable = dict[tuple[int, int], tuple[int, int]]  # (chunk, j) -> (v_F, v_B)


def live_table(actions: list[Action], window: int, start: int,
               per_chunk: bool = False) -> VersionTable:
    """Updates applied before each F(j) and B(j): the live-weight versions.

    ``start`` is the version at the top of the list (updates in earlier segments). With
    ``per_chunk`` a STEP counts for its own chunk only (the local-step schedules, where
    each chunk steps after its own window); otherwise for every chunk of the rank."""
    steps: dict[int, int] = {}
    v_f: dict[tuple[int, int], int] = {}
    out: VersionTable = {}
    for a in actions:
        key = (a.chunk, a.index)
        if a.kind == "STEP":
            scope = a.chunk if per_chunk else -1
            steps[scope] = steps.get(scope, 0) + 1
            continue
        v = start + steps.get(a.chunk if per_chunk else -1, 0)
        if a.kind == "F":
            v_f[key] = v
        elif a.kind == "B":
            if key not in v_f:
                raise ValueError(f"{a} comes before its forward")
            out[key] = (v_f[key], v)
    missing = sorted(set(v_f) - set(out))
    if missing:
        raise ValueError("micro-batches forwarded but never backwarded (chunk, j): "
                         f"{missing}")
    return dict(sorted(out.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def stashed_table(actions: list[Action], window: int, start: int,
                  per_chunk: bool = False) -> VersionTable:
    """PipeDream-2BW: F(j) and B(j) on the same one-step-delayed stashed version (of
    their own chunk when chunks step on their own: the formula is the same)."""
    live_table(actions, window, start, per_chunk)  # the same well-formedness checks
    keys = sorted({(a.chunk, a.index) for a in actions if a.kind == "F"},
                  key=lambda k: (k[1], k[0]))
    return {k: (two_bw_version(k[1], window),) * 2 for k in keys}


class LiveWeights:
    """Live-weight policy; ``steps`` counts the STEPs applied to ``params`` (the
    stage's, or one model chunk's when chunks step on their own)."""

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]] | None = None):
        self.model = model
        self.params = params if params is not None else list(model.named_parameters())
        self.steps = 0

    def forward(self, j: int, **kwargs: Any) -> torch.Tensor:
        return self.model(**kwargs)

    def forward_version(self, j: int) -> int:
        return self.steps

    def backward_version(self, j: int) -> int:
        return self.steps

    def reset(self, steps: int) -> None:
        """Continue counting from ``steps`` updates (a resumed run)."""
        self.steps = steps

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        self.steps += 1

    def live_versions(self) -> int:
        return 1

    def checksum(self, j: int) -> float:
        """Sum of the weights a micro-batch uses now (for verification runs)."""
        return float(sum(p.detach().double().sum() for _, p in self.params))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        pass


class TwoVersionStash:
    """PipeDream-2BW's double-buffered weights on stock PyTorch."""

    def __init__(self, model: nn.Module, window: int,
                 accumulate: Callable[[nn.Parameter, torch.Tensor], None],
                 rebind: Callable[[], None],
                 params: list[tuple[str, nn.Parameter]] | None = None):
        """``accumulate(param, grad)`` folds a snapshot's gradient into the parameter's
        main_grad; ``rebind()`` moves every parameter (and the optimizer's view
        of it) to fresh storage before an update. ``params``: the stage's, or one
        model chunk's (a forward then replaces only those; the chunk uses no others)."""
        self.model = model
        self.window = window
        self.accumulate = accumulate
        self.rebind = rebind
        named = params if params is not None else list(model.named_parameters())
        self.params = [(n, p) for n, p in named if p.requires_grad]
        self.steps = 0
        self.versions: dict[int, dict[str, torch.Tensor]] = {0: self._publish()}
        self.peak_versions = 1

    def _publish(self) -> dict[str, torch.Tensor]:
        """Leaf tensors sharing the parameters' current storage; their grads go to main_grad."""
        snapshot = {}
        for name, p in self.params:
            w = p.detach().requires_grad_(True)
            w.register_post_accumulate_grad_hook(self._hook_for(p))
            snapshot[name] = w
        return snapshot

    def _hook_for(self, p: nn.Parameter) -> Callable[[torch.Tensor], None]:
        def hook(w: torch.Tensor) -> None:
            grad, w.grad = w.grad, None
            self.accumulate(p, grad)

        return hook

    def reset(self, steps: int) -> None:
        """Continue from ``steps`` updates with the live weights as the newest version."""
        self.steps = steps
        self.versions = {steps: self._publish()}

    def version_of(self, j: int) -> int:
        return two_bw_version(j, self.window)

    def forward(self, j: int, **kwargs: Any) -> torch.Tensor:
        v = self.version_of(j)
        if v not in self.versions:
            raise RuntimeError(f"PipeDream-2BW: version {v} for micro-batch {j} is not stashed "
                               f"(have {sorted(self.versions)})")
        return functional_call(self.model, self.versions[v], args=(), kwargs=kwargs)

    def forward_version(self, j: int) -> int:
        return self.version_of(j)

    def backward_version(self, j: int) -> int:
        return self.version_of(j)

    def before_step(self) -> None:
        self.rebind()

    def after_step(self) -> None:
        self.steps += 1
        self.versions[self.steps] = self._publish()
        # After STEP(k) the remaining forwards and the in-flight backwards use
        # versions k-1 and k only (m >= P-1 keeps forwards within one window).
        for v in [v for v in self.versions if v < self.steps - 1]:
            del self.versions[v]
        self.peak_versions = max(self.peak_versions, len(self.versions))

    def live_versions(self) -> int:
        return len(self.versions)

    def checksum(self, j: int) -> float:
        snapshot = self.versions[self.version_of(j)]
        return float(sum(w.detach().double().sum() for w in snapshot.values()))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The older stashed version: the next window's forwards still need it."""
        older = self.versions.get(self.steps - 1)
        if older is None:
            return {}
        return {name: w.detach() for name, w in older.items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the older version after ``reset`` (call with the checkpoint's tensors)."""
        if not state:
            return
        older = {}
        for name, p in self.params:
            w = state[name].detach().clone().requires_grad_(True)
            w.register_post_accumulate_grad_hook(self._hook_for(p))
            older[name] = w
        self.versions[self.steps - 1] = older


Policy = LiveWeights | TwoVersionStash


class ChunkPolicies:
    """One policy per model chunk, for chunks that step on their own; the checkpoint
    and the executor's bookkeeping see the rank's policy through this."""

    def __init__(self, policies: list[Policy]):
        self.policies = policies

    def of(self, chunk: int) -> Policy:
        return self.policies[chunk]

    def reset(self, steps: int) -> None:
        """At a drain every chunk has applied the same number of updates."""
        for p in self.policies:
            p.reset(steps)

    def live_versions(self) -> int:
        return max(p.live_versions() for p in self.policies)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for p in self.policies for k, v in p.state_tensors().items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for p in self.policies:
            names = {n for n, _ in p.params}
            p.load_state_tensors({k: v for k, v in state.items() if k in names})


@dataclass(frozen=True)
class WeightRule:
    """A schedule's weight-version policy, as the registry declares it."""

    name: str
    copies: int  # weight copies a rank holds at most
    table: Callable[[list[Action], int, int, bool], VersionTable]

    def make(self, model: nn.Module, window: int,
             accumulate: Callable[[nn.Parameter, torch.Tensor], None],
             rebind: Callable[[], None],
             params: list[tuple[str, nn.Parameter]] | None = None) -> Policy:
        if self.copies == 2:
            return TwoVersionStash(model, window, accumulate, rebind, params)
        return LiveWeights(model, params)


LIVE = WeightRule("live", 1, live_table)
TWO_VERSIONS = WeightRule("two_versions", 2, stashed_table)
