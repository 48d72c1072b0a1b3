"""Load vocabulary-sized tensors across a change of the padded vocabulary.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by`` x tp, so
the same tokenizer gives the embedding and the head another row count at another tp.
Only the first ``vocab_size`` rows are real tokens; the padding rows are never looked
up and only learn through the softmax, which pushes their logits down. A checkpoint
whose real vocabulary equals this run's therefore converts by rows:

- rows below ``min(saved, new)`` load exactly (every real row, and the padding both have);
- saved padding rows beyond the new padded size are dropped;
- new padding rows are copies of the checkpoint's padding rows, taken in turn (new row
  ``saved + i`` copies saved row ``vocab + i % (saved - vocab)``), weights and AdamW
  moments alike; zeros only where the checkpoint has no padding row. A copy has the
  low logits trained padding has, so it adds little softmax mass; a zero row would
  have logit 0, above trained padding, and move the loss more. The rule depends on
  nothing but the saved tensor, so every rank and every tp derives the same rows.

DCP cannot load a tensor into a target of another shape, so each such tensor is
loaded whole, at its saved shape, on every rank that holds it (memory: one full copy
per converted tensor during the load), and the rank then copies its tp slice of the
converted rows into its own shard.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megatron_paci.checkpoint.integrity import CheckpointError
from megatron_paci.checkpoint.sharding import local_tensor as _local
from megatron_paci.model.gpt import OUTPUT_LAYER, WORD_EMBEDDING

VOCAB_PARAMS = (WORD_EMBEDDING, OUTPUT_LAYER)
FILL_RULE = ("new padding rows start as copies of the checkpoint's padding rows, "
             "with their AdamW moments")


def converted_rows(saved: torch.Tensor, vocab: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of ``saved`` converted to a padded size of at least ``hi`` rows
    (the rule in the module docstring); ``vocab``: the real vocabulary size."""
    have = saved.shape[0]
    if not 0 <= vocab <= have:
        raise ValueError(f"a vocabulary of {vocab} rows does not fit a tensor of {have} rows")
    idx = torch.arange(lo, hi)
    pad, beyond = have - vocab, idx >= have
    if pad == 0 and beyond.any():
        out = saved.new_zeros((hi - lo, *saved.shape[1:]))
        out[~beyond] = saved[idx[~beyond]]
        return out
    idx[beyond] = vocab + (idx[beyond] - have) % max(pad, 1)
    return saved[idx]


def saved_vocab_size(path: str, meta: dict[str, Any], tokenizer_vocab: int | None) -> int | None:
    """The real vocabulary of the checkpoint at ``path``: ``meta.json``'s ``vocab_size``,
    or (older checkpoints) its ``config.yaml``'s ``model.vocab_size``, else the
    tokenizer's size (``tokenizer_vocab``, this run's, as the resume check assumes);
    None where neither says."""
    if "vocab_size" in meta:
        return int(meta["vocab_size"])
    config = os.path.join(path, "config.yaml")
    if os.path.isfile(config):
        import yaml

        with open(config) as f:
            model = (yaml.safe_load(f) or {}).get("model") or {}
        if model.get("vocab_size"):
            return int(model["vocab_size"])
    return tokenizer_vocab


def param_of(key: str) -> str:
    """The parameter a checkpoint key ``<section>.<name>[.<state>]`` belongs to."""
    section, _, rest = key.partition(".")
    return rest.rsplit(".", 1)[0] if section == "optimizer" else rest


class VocabRowLoad:
    """The vocabulary tensors of one load whose saved row count differs: ``plan`` swaps
    their targets in the DCP tree for ones of the saved shape, ``finish`` (after the
    load) converts the rows into the original targets and puts them back."""

    def __init__(self, path: str, vocab: int | None, saved_vocab: int | None) -> None:
        self.path, self.vocab, self.saved_vocab = path, vocab, saved_vocab
        self.swapped: list[tuple[dict[str, Any], str, Any]] = []
        self.rows: tuple[int, int] | None = None  # (saved, new), for the log

    def plan(self, tree: dict[str, Any], saved: dict[str, tuple[int, ...]]) -> None:
        for section in ("model", "optimizer", "pipeline_stash"):
            targets = tree.get(section) or {}
            for key, t in list(targets.items()):
                shape = saved.get(f"{section}.{key}")
                if shape is None or param_of(f"{section}.{key}") not in VOCAB_PARAMS:
                    continue
                new = tuple(t.shape)
                if shape == new or len(shape) != len(new) or not new or shape[1:] != new[1:]:
                    continue  # equal, or not a row change: the shape check names it
                self._check_vocab(f"{section}.{key}", shape[0], new[0])
                local = _local(t)
                targets[key] = torch.empty(shape, dtype=local.dtype, device=local.device)
                self.swapped.append((targets, key, t))
                self.rows = (shape[0], new[0])

    def _check_vocab(self, key: str, saved_rows: int, new_rows: int) -> None:
        if self.vocab is None or self.saved_vocab is None:
            raise CheckpointError(
                f"{self.path}: {key} has {saved_rows} rows in the checkpoint but {new_rows} "
                "in this model, and the real vocabulary size of the checkpoint or of this "
                "run is unknown, so the padding rows cannot be told apart")
        if self.saved_vocab != self.vocab:
            raise CheckpointError(
                f"{self.path} was trained with a vocabulary of {self.saved_vocab} tokens "
                f"and this run has {self.vocab} (model.vocab_size or the tokenizer's): its "
                f"{key} ({saved_rows} rows) cannot become {new_rows} rows; use the "
                "checkpoint's tokenizer and model.vocab_size")
        if not self.vocab <= min(saved_rows, new_rows):
            raise CheckpointError(
                f"{self.path}: {key} has {saved_rows} rows in the checkpoint and "
                f"{new_rows} in this model, fewer than the vocabulary of {self.vocab}")

    def finish(self) -> None:
        """Copy each rank's slice of the converted rows into its target; restore the tree."""
        for targets, key, original in self.swapped:
            full = targets[key]
            assert self.vocab is not None
            if hasattr(original, "fill_from"):  # ZeRO-1 blocks, at global offsets
                original.fill_from(converted_rows(full, self.vocab, 0, original.shape[0]))
                targets[key] = original
                continue
            local = _local(original)
            lo = 0
            if hasattr(original, "to_local"):
                (placement,) = original.placements
                if getattr(placement, "dim", None) != 0:
                    raise CheckpointError(f"{self.path}: {key} is sharded as {placement}; "
                                          "a vocabulary conversion needs row shards")
                lo = original.device_mesh.get_local_rank() * local.shape[0]
            with torch.no_grad():
                local.copy_(converted_rows(full, self.vocab, lo, lo + local.shape[0]))
            targets[key] = original
        self.swapped.clear()
