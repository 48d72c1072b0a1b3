"""Turn a local Hugging Face GPT-2 directory into a run directory that trains on from it.

``python -m megatron_paci.checkpoint.import_hf --model DIR --output RUN_DIR [a.b=value ...]``
writes ``RUN_DIR/config.yaml`` (the model section from ``config.json``, the overrides on
top) and ``RUN_DIR/checkpoints/iter_0000000``: a complete checkpoint at iteration 0 with
the weights, zero AdamW moments and the seeded RNG state of every rank, which
``python pretrain_gpt.py --config RUN_DIR/config.yaml`` resumes from like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import torch

from megatron_paci.checkpoint.format import latest_checkpoint, save_checkpoint
from megatron_paci.checkpoint.hf import UnsupportedFeature, from_hf_state, model_section_from_hf
from megatron_paci.config.loader import ConfigError, parse_override, set_value, to_yaml, validate
from megatron_paci.config.schema import Config
from megatron_paci.model.gpt import padded_vocab_size

# model.* keys an override may change: they do not alter what the weights compute.
FREE_MODEL_KEYS = ("seq_length", "dropout", "attention_dropout", "init_std",
                   "make_vocab_size_divisible_by")


def _eos_token(model_dir: str) -> str | None:
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        token = json.load(f).get("eos_token")
    return token.get("content") if isinstance(token, dict) else token


def find_tokenizer(model_dir: str, output: str) -> tuple[str, str, list[tuple[str, str]], str]:
    """The directory's tokenizer as it will live in ``output/tokenizer``: (data.tokenizer
    spec, the spec of the source files, files to copy, what to print)."""
    dest = os.path.join(output, "tokenizer")
    eos = _eos_token(model_dir)
    bpe = [os.path.join(model_dir, f) for f in ("vocab.json", "merges.txt")]
    if all(os.path.isfile(f) for f in bpe):
        suffix = f"#eod={eos}" if eos and eos != "<|endoftext|>" else ""
        return (dest + suffix, f"gpt2-bpe:{bpe[0]},{bpe[1]}{suffix}",
                [(f, os.path.join(dest, os.path.basename(f))) for f in bpe],
                f"tokenizer: GPT-2 BPE vocab.json + merges.txt copied to {dest}")
    single = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(single):
        path = os.path.join(dest, "tokenizer.json")
        suffix = f"#eod={eos}" if eos else ""
        return (path + suffix, single + suffix, [(single, path)],
                f"tokenizer: tokenizer.json copied to {dest}")
    return "", "", [], (f"note: {model_dir} holds no vocab.json + merges.txt or tokenizer.json; "
                    "set data.tokenizer when training")


def _check_tokenizer(spec: str, vocab_size: int) -> None:
    from megatron_paci.data.tokenizer import build_tokenizer

    n = build_tokenizer(spec).vocab_size
    if n > vocab_size:
        raise ValueError(f"tokenizer {spec} has {n} tokens, more than the model's vocab_size "
                         f"{vocab_size} in config.json")


def build_config(hf: dict[str, Any], output: str, tokenizer: str,
                 overrides: list[str]) -> Config:
    cfg = Config()
    model = model_section_from_hf(hf)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.run.dir = os.path.abspath(output)
    cfg.data.tokenizer = tokenizer
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value, " on the command line")
        name = key.split(".", 1)[1]
        if key.startswith("model.") and name not in FREE_MODEL_KEYS and \
                getattr(cfg.model, name) != model[name]:
            raise ConfigError(f"{key}={value} on the command line contradicts the GPT-2 "
                              f"config.json (model.{name}={model[name]}); only "
                              f"{', '.join('model.' + k for k in FREE_MODEL_KEYS)} may change")
    validate(cfg)
    return cfg


def rng_states(cfg: Config, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Each rank's RNG state as a freshly seeded run of that layout starts with it."""
    from megatron_paci.parallel.random import capture_rng, restore_rng, seed_everything
    from megatron_paci.parallel.state import rank_coordinates
    from megatron_paci.tensor_parallel import model_parallel_seed

    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if world_size < 1 or world_size % (tp * pp):
        raise ConfigError(f"--world-size {world_size} is not a multiple of parallel.tensor="
                          f"{tp} x parallel.pipeline={pp}")
    saved = capture_rng()
    out = {}
    try:
        for rank in range(world_size):
            tp_rank, _, pp_rank = rank_coordinates(rank, tp, world_size // (tp * pp))
            seed_everything(cfg.train.seed)
            tracker = model_parallel_seed(cfg.train.seed, tp_rank, pp_rank)
            state = capture_rng()
            state.update({f"tracker.{k}": v for k, v in tracker.get_states().items()})
            out[f"rng_rank{rank}"] = state
    finally:
        restore_rng(saved)
    return out


def load_hf_weights(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model, info = GPT2LMHeadModel.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    missing = info.get("missing_keys") or []
    if missing:
        raise ValueError(f"{model_dir}: the weights have no {sorted(missing)[0]}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return model.state_dict()


def import_model(model_dir: str, output: str, overrides: list[str],
                 world_size: int | None = None) -> list[str]:
    """Write the run directory; returns the lines to print."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--model {model_dir}: no config.json (expected a local "
                                "transformers GPT-2 directory)")
    with open(config_path) as f:
        hf = json.load(f)
    model_section_from_hf(hf)  # refuse before anything is written
    if latest_checkpoint(os.path.join(output, "checkpoints")) is not None:
        raise FileExistsError(f"--output {output} already holds a checkpoint; give a new "
                              "run directory")
    tok_spec, source_spec, tok_files, tok_note = find_tokenizer(model_dir, output)
    cfg = build_config(hf, output, tok_spec, overrides)
    if cfg.data.tokenizer != tok_spec:  # given on the command line
        source_spec, tok_files = cfg.data.tokenizer, []
        tok_note = f"tokenizer: data.tokenizer={cfg.data.tokenizer}"
    if source_spec:
        _check_tokenizer(source_spec, cfg.model.vocab_size)
    world = world_size or cfg.parallel.tensor * cfg.parallel.pipeline
    rng = rng_states(cfg, world)
    m = cfg.model
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by,
                               cfg.parallel.tensor)
    weights = from_hf_state(load_hf_weights(model_dir), m, padded)
    optimizer = {}
    for name, t in weights.items():
        optimizer[f"{name}.step"] = torch.zeros((), dtype=torch.float32)
        optimizer[f"{name}.exp_avg"] = torch.zeros_like(t)
        optimizer[f"{name}.exp_avg_sq"] = torch.zeros_like(t)
    from megatron_paci.optim.lr_schedule import LRSchedule

    meta = {
        "consumed_samples": 0, "skipped_iters": 0,
        "lr_schedule": LRSchedule(cfg.optim, cfg.train.iters).state_dict(),
        "schedule": cfg.pipeline.schedule, "pipeline_stash": False,
        "layout": {"world": 1, "tensor": 1, "pipeline": 1, "data": 1},
        "imported_from": os.path.abspath(model_dir),
        "vocab_size": m.vocab_size,
    }
    for src, dst in tok_files:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
    os.makedirs(output, exist_ok=True)
    text = to_yaml(cfg)
    path = save_checkpoint(os.path.join(output, "checkpoints"), 0,
                           {"model": weights, "optimizer": optimizer, **rng}, meta, text)
    with open(os.path.join(output, "config.yaml"), "w") as f:
        f.write(text)
    lines = [f"imported {model_dir} to {path} ({m.num_layers} layers, hidden {m.hidden_size}, "
             f"vocabulary {m.vocab_size}"
             + (f" padded to {padded}" if padded != m.vocab_size else "") + ", "
             + ("tied" if m.tie_embeddings else "untied") + f" head; RNG state for {world} "
             f"rank{'s' if world > 1 else ''})", tok_note]
    if hf.get("embd_pdrop", m.dropout) != m.dropout:
        lines.append(f"note: embd_pdrop={hf['embd_pdrop']} differs from resid_pdrop; "
                     f"model.dropout={m.dropout} applies to both here")
    lines.append(f"train on with: python pretrain_gpt.py --config "
                 f"{os.path.join(output, 'config.yaml')}"
                 + ("" if cfg.data.path else " data.path=[PREFIX]")
                 + ("" if cfg.data.tokenizer else " data.tokenizer=..."))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_paci.checkpoint.import_hf",
        description="Write a local Hugging Face GPT-2 model as a run directory at iteration 0.")
    p.add_argument("--model", required=True, help="a transformers GPT-2 directory")
    p.add_argument("--output", required=True, help="the run directory to write")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks the run will use (default parallel.tensor x parallel.pipeline); "
                        "each gets its RNG state")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    try:
        lines = import_model(args.model, args.output, args.overrides, args.world_size)
    except (UnsupportedFeature, ConfigError, FileNotFoundError, FileExistsError,
            ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
