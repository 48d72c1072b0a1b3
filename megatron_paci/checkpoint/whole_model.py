"""A checkpoint of any layout as one whole model in one process (sampling, HF export).

Parameter names are global, so a pipeline- or tensor-parallel checkpoint loads into
one process (DCP reshards); the vocabulary keeps the padding it was trained with,
and the head is built tied or untied as the checkpoint trained it.
"""

from __future__ import annotations

import dataclasses
import os

import yaml

from megatron_paci.checkpoint.format import META_FILE, list_checkpoints, load_checkpoint, read_meta
from megatron_paci.checkpoint.parts import saved_head_is_tied
from megatron_paci.config import config_from_dict
from megatron_paci.data.tokenizer import build_tokenizer
from megatron_paci.model.gpt import GPTModel
from megatron_paci.model.vocab import resolve_vocab_size


def find_checkpoint(run_dir: str | None, checkpoint: str | None = None) -> str:
    """The checkpoint directory to sample from: ``checkpoint`` is an iteration number
    (looked up under ``run_dir/checkpoints``), a checkpoint directory, or None for
    the newest one of ``run_dir``. Raises FileNotFoundError naming what exists."""
    if checkpoint is not None and not checkpoint.isdigit():
        if not os.path.isfile(os.path.join(checkpoint, META_FILE)):
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no {META_FILE} there; give "
                                    "a checkpoint directory (iter_NNNNNNN) or an iteration")
        return checkpoint
    if run_dir is None:
        raise FileNotFoundError("give --run-dir (or --checkpoint with a checkpoint directory)")
    root = os.path.join(run_dir, "checkpoints")
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    if checkpoint is None:
        return found[-1][1]
    for iteration, path in found:
        if iteration == int(checkpoint):
            return path
    have = ", ".join(str(i) for i, _ in found)
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint at that "
                            f"iteration under {root}; available iterations: {have}")


def load_whole_model(run_dir: str | None, checkpoint: str | None = None
                        ) -> tuple[GPTModel, object, str]:
    """A checkpoint of ``run_dir`` (see ``find_checkpoint``) as one whole model in this
    process, whatever layout wrote it, with the tokenizer it was trained with.

    Parameter names are global, so a pipeline- or tensor-parallel checkpoint loads
    into one process (DCP reshards); the vocabulary keeps the padding it was
    trained with, and a head the schedule untied stays untied.
    """

    path = find_checkpoint(run_dir, checkpoint)
    meta = read_meta(path)
    with open(os.path.join(path, "config.yaml")) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    layout = meta.get("layout", {})
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = resolve_vocab_size(cfg, tokenizer.vocab_size, layout.get("tensor", 1))
    # The head the checkpoint trained: tied, or untied (a schedule untied it).
    model_cfg = dataclasses.replace(cfg.model, tie_embeddings=saved_head_is_tied(path, meta))
    model = GPTModel(model_cfg, vocab, seed=cfg.train.seed)
    load_checkpoint(path, {"model": model.state_dict()})
    return model, tokenizer, path
