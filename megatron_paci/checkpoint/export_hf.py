"""Write a checkpoint as a Hugging Face GPT-2 directory (config.json, model.safetensors,
the tokenizer where transformers can read it).

``python -m megatron_paci.checkpoint.export_hf --checkpoint DIR --output OUT``; DIR is a
run directory (its newest checkpoint) or one ``iter_NNNNNNN`` directory. Any layout
loads: the model is read whole, in this process (``checkpoint.whole_model``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

from megatron_paci.checkpoint.hf import UnsupportedFeature, hf_config_kwargs, to_hf_state


def resolve_checkpoint(path: str) -> tuple[str, str | None]:
    """(run dir, checkpoint dir or None for the run's newest) for ``--checkpoint``."""
    from megatron_paci.checkpoint.format import META_FILE

    if os.path.isfile(os.path.join(path, META_FILE)):
        return os.path.dirname(os.path.dirname(os.path.abspath(path))), path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path, None
    raise FileNotFoundError(f"--checkpoint {path}: neither a run directory (with checkpoints/) "
                            f"nor a checkpoint directory (with {META_FILE})")


def export_tokenizer(tokenizer: Any, out: str, max_length: int) -> str:
    """Write ``tokenizer`` for transformers' AutoTokenizer; returns what was done."""
    desc = tokenizer.describe()
    kind, files = desc["kind"], desc["files"]
    if kind == "gpt2-bpe":
        shutil.copyfile(files[0], os.path.join(out, "vocab.json"))
        shutil.copyfile(files[1], os.path.join(out, "merges.txt"))
        with open(files[0]) as f:
            eod = {i: t for t, i in json.load(f).items()}[tokenizer.eod]
        _write_json(os.path.join(out, "tokenizer_config.json"), {
            "tokenizer_class": "GPT2Tokenizer", "bos_token": eod, "eos_token": eod,
            "unk_token": eod, "add_prefix_space": False, "model_max_length": max_length})
        return f"tokenizer: GPT-2 BPE vocab.json + merges.txt from {os.path.dirname(files[0])}"
    if kind == "hf-tokenizer-json":
        from tokenizers import Tokenizer

        shutil.copyfile(files[0], os.path.join(out, "tokenizer.json"))
        eod = Tokenizer.from_file(files[0]).id_to_token(tokenizer.eod)
        _write_json(os.path.join(out, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod,
            "model_max_length": max_length})
        return f"tokenizer: {files[0]} copied as tokenizer.json"
    if kind == "sentencepiece":
        return (f"note: tokenizer not written: the sentencepiece model {files[0]} has no "
                "transformers form that encodes exactly as it does; use it with "
                "sentencepiece directly")
    return f"note: tokenizer not written: a {kind} tokenizer has no transformers form"


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def export(checkpoint: str, output: str) -> list[str]:
    """Export ``checkpoint`` to ``output``; returns the lines to print."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from megatron_paci.checkpoint.whole_model import load_whole_model

    run_dir, path = resolve_checkpoint(checkpoint)
    model, tokenizer, path = load_whole_model(run_dir, checkpoint=path)
    cfg = model.cfg
    vocab = cfg.vocab_size or tokenizer.vocab_size
    tied = model.output_layer is None
    hf_state = to_hf_state(model.state_dict(), cfg, vocab)
    config = GPT2Config(**hf_config_kwargs(cfg, vocab, tied, tokenizer.eod))
    hf_model = GPT2LMHeadModel(config)
    hf_model.load_state_dict(hf_state, strict=True)
    os.makedirs(output, exist_ok=True)
    hf_model.save_pretrained(output)
    lines = [f"exported {path} to {output} (GPT-2, {cfg.num_layers} layers, "
             f"{'tied' if tied else 'untied'} head)"]
    if model.vocab_size != vocab:
        lines.append(f"vocabulary: {vocab} tokens; the {model.vocab_size - vocab} padding rows "
                     f"(Megatron's multiple of model.make_vocab_size_divisible_by) are dropped")
    lines.append(export_tokenizer(tokenizer, output, config.n_positions))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_paci.checkpoint.export_hf",
                                description="Write a checkpoint as a Hugging Face GPT-2 model.")
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its newest checkpoint) or an iter_NNNNNNN directory")
    p.add_argument("--output", required=True, help="directory to write")
    args = p.parse_args(argv)
    try:
        lines = export(args.checkpoint, args.output)
    except (UnsupportedFeature, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
