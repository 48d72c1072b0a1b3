"""What a checkpoint holds, as stateful parts with symmetric save and load.

The trainer lists its parts (model, optimizer, RNG, the schedule's weight stash, and
the JSON state: progress, LR schedule, layout) in a ``TrainingCheckpoint``, which is
the one place that builds the tensor tree and reads the meta keys.

Any layout loads any other's checkpoint: tensors are keyed by global parameter name
and tp shards are described as global DTensors, so DCP reshards. What a layout
change needs beyond that lives here:

- **Heads.** A tied checkpoint loaded into an untied head (a pipeline's last stage
  under an asynchronous schedule, or ``model.tie_embeddings=false``) starts the head,
  and its optimizer state, as copies of the embedding's. An untied checkpoint loaded
  into a tied model is refused unless the two are equal, or
  ``checkpoint.untied_head=use_embedding|use_head`` says which one the tie keeps.
- **Padded vocabulary.** The embedding and head rows are padded to a multiple of
  ``model.make_vocab_size_divisible_by`` x tp, so another tp (or divisor) gives them
  another row count. With the same real vocabulary (``meta.json``'s ``vocab_size``)
  they, their AdamW moments and 2BW's stashed copies convert by rows
  (``vocab_rows.py``): real rows load exactly, surplus padding is dropped, new padding
  rows copy the saved padding rows. Another real vocabulary is refused.
- **RNG.** States restore exactly when the layout is the same; otherwise every rank
  re-derives its state from the seed, its ranks and the iteration, and says so.
- **Nothing in silence.** Every model and optimizer tensor in the checkpoint is
  loaded by some rank of the new layout, dropped by a rule that is logged, or named
  in an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_paci.checkpoint.flat_shards import FlatShard
from megatron_paci.checkpoint.format import (
    CheckpointError,
    SafeFileSystemReader,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from megatron_paci.checkpoint.sharding import as_global
from megatron_paci.checkpoint.sharding import local_tensor as _local
from megatron_paci.checkpoint.vocab_rows import (
    FILL_RULE,
    VOCAB_PARAMS,
    VocabRowLoad,
    param_of,
    saved_vocab_size,
)

EMBEDDING, HEAD = VOCAB_PARAMS
HEAD_CHOICES = ("refuse", "use_embedding", "use_head")

Log = Callable[[str], None]


def _clone_target(t: Any) -> Any:
    """A load target with its own storage (DTensor-aware)."""
    if hasattr(t, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t.to_local().clone(), t.device_mesh, t.placements,
                                  run_check=False, shape=t.shape, stride=t.stride())
    return t.clone()


def saved_tensor_keys(path: str) -> dict[str, tuple[int, ...]]:
    """Every tensor key in a checkpoint's DCP metadata with its global shape; no tensor
    data is read."""
    md = SafeFileSystemReader(path).read_metadata()
    return {k: tuple(getattr(v, "size", ())) for k, v in md.state_dict_metadata.items()}


def _union_over_ranks(local: set[str]) -> set[str]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return set(local)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, sorted(local))
    return set().union(*map(set, out))


class HeadRule:
    """Which checkpoint name each of this rank's parameters loads from, and which saved
    names a tie leaves out. ``saved_tied``: the checkpoint trained one tied tensor (a
    pipeline copy of it, if saved, is equal by construction)."""

    def __init__(self, saved_tied: bool, model_tied: bool, choice: str) -> None:
        if choice not in HEAD_CHOICES:
            raise CheckpointError(f"checkpoint.untied_head={choice!r}: expected one of "
                                  f"{', '.join(HEAD_CHOICES)}")
        self.saved_tied, self.model_tied, self.choice = saved_tied, model_tied, choice

    def source(self, name: str) -> str:
        if self.saved_tied and name == HEAD:
            return EMBEDDING
        if not self.saved_tied and self.model_tied and name in (EMBEDDING, HEAD):
            return HEAD if self.choice == "use_head" else EMBEDDING
        return name

    def dropped(self) -> set[str]:
        if self.saved_tied:
            return {HEAD}  # a saved pipeline copy of the tied embedding
        if self.model_tied:
            return {EMBEDDING} if self.choice == "use_head" else {HEAD}
        return set()

    @property
    def needs_equal_check(self) -> bool:
        return not self.saved_tied and self.model_tied and self.choice == "refuse"


class ModelPart:
    """The model's tensors by global name (tp shards as DTensors)."""

    def __init__(self, model: torch.nn.Module, pstate: Any) -> None:
        self.model, self.pstate = model, pstate
        self.dims = {n: getattr(p, "tensor_parallel_dim", None)
                     for n, p in model.named_parameters()}

    def dim(self, name: str) -> int | None:
        return self.dims.get(name)

    def state_dict(self) -> dict[str, Any]:
        return {n: as_global(t, self.dims.get(n), self.pstate)
                for n, t in self.model.state_dict().items()}


class OptimizerPart:
    """AdamW state as ``<param>.<key>``, the same global tensors for the plain and the
    ZeRO-1 path: a ZeRO-1 rank saves and loads its own slices in place (``FlatShard``),
    with no gather."""

    def __init__(self, optimizer: Any, model: ModelPart, pstate: Any) -> None:
        self.optimizer, self.model, self.pstate = optimizer, model, pstate

    def state_dict(self, create: bool = False) -> dict[str, Any]:
        out = {}
        tp_rank, tp_size = self.pstate.tensor_rank, self.pstate.tensor_size
        for key, t in self.optimizer.checkpoint_state(create=create).items():
            dim = self.model.dim(key.rsplit(".", 1)[0])
            if isinstance(t, list):
                out[key] = FlatShard.of(t, dim, tp_rank, tp_size)
            else:
                out[key] = as_global(t, dim if t.ndim else None, self.pstate)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_checkpoint_state(
            {k: v if isinstance(v, FlatShard) else _local(v) for k, v in state.items()})


class RngPart:
    """Every rank's RNG states under its own key; re-derived when the layout changed."""

    def __init__(self, rank: int, capture: Callable[[], dict], restore: Callable[[dict], None],
                 rederive: Callable[[int], None]) -> None:
        self.rank, self.capture, self.restore, self.rederive = rank, capture, restore, rederive

    def key(self) -> str:
        return f"rng_rank{self.rank}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key(): self.capture()}


class TrainingCheckpoint:
    """Saves and loads the trainer's parts as one checkpoint."""

    def __init__(self, *, model: ModelPart, optimizer: OptimizerPart, rng: RngPart,
                 policy: Any, stashes: bool, json_state: Callable[[], dict[str, Any]],
                 layout: dict[str, int], model_tied: bool, head_choice: str,
                 log: Log, vocab_size: int | None = None,
                 tokenizer_vocab: int | None = None) -> None:
        """``policy`` is the schedule's weight-version policy: its step counter is schedule
        state, and with ``stashes`` (PipeDream-2BW) so is its older weight version.
        ``vocab_size``: the real (unpadded) vocabulary, recorded in meta.json;
        ``tokenizer_vocab``: the tokenizer's size, for checkpoints that lack it."""
        self.model, self.optimizer, self.rng = model, optimizer, rng
        self.policy, self.stashes = policy, stashes
        self.json_state, self.layout = json_state, layout
        self.model_tied, self.head_choice, self.log = model_tied, head_choice, log
        self.vocab_size, self.tokenizer_vocab = vocab_size, tokenizer_vocab

    # --- save -----------------------------------------------------------------------

    def save(self, root: str, iteration: int, config_yaml: str, keep_last: int,
             async_save: bool = False) -> str:
        tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   **self.rng.state_dict()}
        if self.stashes:
            older = self.policy.state_tensors() or {
                n: p.detach() for n, p in self.model.model.named_parameters()}
            tensors["pipeline_stash"] = {n: as_global(t, self.model.dim(n), self.model.pstate)
                                         for n, t in older.items()}
        meta = {**self.json_state(), "pipeline_stash": self.stashes,
                "layout": self.layout, "head": "tied" if self.model_tied else "untied"}
        if self.vocab_size is not None:
            meta["vocab_size"] = self.vocab_size
        return save_checkpoint(root, iteration, tensors, meta, config_yaml,
                               keep_last=keep_last, async_save=async_save)

    # --- load -----------------------------------------------------------------------

    def load(self, path: str, saved_tied: bool) -> dict[str, Any]:
        """Load ``path`` into the parts; return its meta. ``saved_tied``: the checkpoint
        trained one tied embedding/head tensor."""
        meta = read_meta(path)
        saved = saved_tensor_keys(path)
        rule = HeadRule(saved_tied, self.model_tied, self.head_choice)
        if rule.needs_equal_check:
            self._check_untied_head_equal(path, saved)
        model = self.model.state_dict()
        optim = self.optimizer.state_dict(create=True)
        tree: dict[str, Any] = {"model": {}, "optimizer": {}}
        copies: list[tuple[dict, str, str]] = []  # (section targets, name, source): after
        for section, targets, split in (("model", model, False), ("optimizer", optim, True)):
            for key, t in targets.items():
                name, suffix = (key.rsplit(".", 1) if split else (key, ""))
                src = rule.source(name) + (f".{suffix}" if suffix else "")
                if src in tree[section]:
                    copies.append((targets, key, src))  # both on this rank
                    continue
                tree[section][src] = t
        saved_layout = {"virtual_pipeline": 1, **meta.get("layout", {})}
        same = saved_layout == self.layout
        if same:
            tree.update(self.rng.state_dict())
        stash_targets = None
        if self.stashes and meta.get("pipeline_stash"):
            params = dict(self.model.model.named_parameters())
            stash_targets = {n: _clone_target(t) for n, t in self.model.state_dict().items()
                             if n in params and f"pipeline_stash.{n}" in saved}
            tree["pipeline_stash"] = stash_targets
        vocab_rows = self._plan_vocab_rows(path, meta, tree, saved)
        mismatched = {
            f"{section}.{key} has shape {list(saved[f'{section}.{key}'])} in the checkpoint "
            f"but {list(t.shape)} in this model"
            for section in ("model", "optimizer") for key, t in tree[section].items()
            if f"{section}.{key}" in saved
            and tuple(t.shape) != tuple(saved[f"{section}.{key}"])}
        # Every rank reaches the same verdict (a rank alone would leave the others in
        # DCP's collective load).
        mismatched = _union_over_ranks(mismatched)
        if mismatched:
            raise CheckpointError(
                f"{path}: {sorted(mismatched)[0]}; model.* must match the checkpoint's "
                f"config.yaml (python -m megatron_paci.checkpoint.inspect {path} --config "
                "CONFIG shows the difference)")
        consumed = {f"{s}.{k}" for s in ("model", "optimizer") for k in tree[s]}
        everywhere = _union_over_ranks(consumed)
        dropped = rule.dropped()
        left = [k for k in sorted(saved) if k.split(".", 1)[0] in ("model", "optimizer")
                and k not in everywhere and param_of(k) not in dropped]
        if left:
            shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
            raise CheckpointError(
                f"{path} holds tensors this layout would not load: {shown}; every tensor "
                "of a checkpoint is loaded or refused (compare model.* with the "
                "checkpoint's config.yaml)")
        for key in sorted(saved):
            if key.split(".", 1)[0] == "model" and param_of(key) in dropped and \
                    f"model.{param_of(key)}" not in everywhere:
                self.log(f"checkpoint: {key} is not loaded ({_why_dropped(rule)})")
                break
        load_checkpoint(path, tree)
        vocab_rows.finish()
        # A ZeRO-1 rank's slices of the copy sit elsewhere in the tensor than those of
        # the tensor it copies: it reads them from the checkpoint itself, in a second
        # load that every rank joins.
        again: dict[str, Any] = {"optimizer": {}}
        for targets, key, src in copies:
            section = "optimizer" if targets is optim else "model"
            if isinstance(targets[key], FlatShard):
                again["optimizer"][src] = targets[key]
                continue
            with torch.no_grad():
                _local(targets[key]).copy_(_local(tree[section][src]))
        if _union_over_ranks({"again"} if again["optimizer"] else set()):
            rows = self._vocab_rows(path, meta)
            rows.plan(again, saved)
            load_checkpoint(path, again, verify=False)
            rows.finish()
        for name in (HEAD, EMBEDDING):
            if name in self.model.dims and rule.source(name) != name:
                self.log(f"checkpoint: {name} and its optimizer state start from the "
                         f"checkpoint's {rule.source(name)} ({_why_dropped(rule)})")
        self.optimizer.load_state_dict(optim)
        if same:
            self.rng.restore(tree[self.rng.key()])
        else:
            self.rng.rederive(meta["iteration"])
            self.log(f"checkpoint: layout {_layout(meta.get('layout', {}))} -> "
                     f"{_layout(self.layout)}: each rank's RNG re-derived from train.seed, "
                     "its ranks and the iteration (exact RNG restore needs the same layout)")
        # Versions count every STEP, skipped or not: one per iteration.
        self.policy.reset(meta["iteration"])
        if stash_targets is not None:
            older = {n: p.detach().clone() for n, p in self.model.model.named_parameters()}
            older.update({k: _local(v) for k, v in stash_targets.items()})
            self.policy.load_state_tensors(older)
        elif self.stashes and meta["iteration"] > 0:
            self.log(f"checkpoint: {path} holds no older weight version (written by another "
                     "schedule); PipeDream-2BW starts its stash from the loaded weights")
            self.policy.load_state_tensors(
                {n: p.detach().clone() for n, p in self.model.model.named_parameters()})
        elif any(k.startswith("pipeline_stash.") for k in saved):
            self.log(f"checkpoint: {path} holds PipeDream-2BW's older weight version; this "
                     "schedule keeps one copy and does not load it")
        return meta

    def _vocab_rows(self, path: str, meta: dict[str, Any]) -> VocabRowLoad:
        return VocabRowLoad(path, self.vocab_size,
                            saved_vocab_size(path, meta, self.tokenizer_vocab))

    def _plan_vocab_rows(self, path: str, meta: dict[str, Any], tree: dict[str, Any],
                         saved: dict[str, tuple[int, ...]]) -> VocabRowLoad:
        """Swap the targets of vocabulary tensors whose padded row count changed for ones
        of the saved shape (converted by ``finish`` after the load). Collective: every
        rank reaches the same verdict, holding such tensors or not."""
        rows = self._vocab_rows(path, meta)
        try:
            rows.plan(tree, saved)
            problems: set[str] = set()
        except CheckpointError as e:
            problems = {str(e)}
        problems = _union_over_ranks(problems)
        if problems:
            raise CheckpointError(sorted(problems)[0])
        changed = _union_over_ranks({f"{rows.rows[0]} -> {rows.rows[1]}"} if rows.rows else set())
        for change in sorted(changed):
            self.log(f"checkpoint: the padded vocabulary changes {change} rows; the first "
                     f"{self.vocab_size} rows load exactly, padding rows beyond the new size "
                     f"are dropped, {FILL_RULE}")
        return rows

    def _check_untied_head_equal(self, path: str, saved: dict[str, tuple[int, ...]]) -> None:
        emb_key, head_key = f"model.{EMBEDDING}", f"model.{HEAD}"
        if emb_key not in saved or head_key not in saved:
            return
        shape = saved[emb_key]
        tree = {"model": {EMBEDDING: torch.empty(shape), HEAD: torch.empty(saved[head_key])}}
        load_checkpoint(path, tree)
        if not torch.equal(tree["model"][EMBEDDING], tree["model"][HEAD]):
            raise CheckpointError(
                f"{path} was trained with an untied output layer that differs from the "
                "embedding, and this run ties them (model.tie_embeddings=true). Keep the "
                "trained head with model.tie_embeddings=false, or tie with "
                "checkpoint.untied_head=use_embedding or checkpoint.untied_head=use_head")
        self.log(f"checkpoint: {path}'s untied head equals its embedding; tying them "
                 "loses nothing")


def _why_dropped(rule: HeadRule) -> str:
    if rule.saved_tied:
        return "the checkpoint's embedding and head are one tied tensor"
    if rule.choice == "use_head":
        return "checkpoint.untied_head=use_head: the tie keeps the trained head"
    if rule.choice == "use_embedding":
        return "checkpoint.untied_head=use_embedding: the tie keeps the embedding"
    return "the checkpoint's untied head equals its embedding"


def _layout(layout: dict[str, int]) -> str:
    if not layout:
        return "unknown"
    text = (f"tp{layout.get('tensor', 1)} pp{layout.get('pipeline', 1)} "
            f"dp{layout.get('data', 1)}")
    v = layout.get("virtual_pipeline", 1)
    return text + (f" v{v}" if v > 1 else "")


def saved_head_is_tied(path: str, meta: dict[str, Any] | None = None) -> bool:
    """Whether the checkpoint at ``path`` trained one tied embedding/head tensor: its
    meta says so, or (older checkpoints) its config and schedule imply it."""
    meta = read_meta(path) if meta is None else meta
    if "head" in meta:
        return meta["head"] == "tied"
    import os

    import yaml

    from megatron_paci.config import config_from_dict
    from megatron_paci.pipeline.registry import get_schedule

    with open(os.path.join(path, "config.yaml")) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    stages = meta.get("layout", {}).get("pipeline", 1)
    spec = get_schedule(meta.get("schedule", cfg.pipeline.schedule))
    return spec.stage_model_config(cfg.model, stages).tie_embeddings
