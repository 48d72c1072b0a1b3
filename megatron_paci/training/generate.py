"""Text sampling from a whole (single-stage) model, to eyeball what training learned."""

from __future__ import annotations

import torch

from megatron_paci.model.gpt import GPTModel


@torch.no_grad()
def sample(
    model: GPTModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    vocab_limit: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Top-k sampling; ``vocab_limit`` masks the padded vocabulary entries."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    window = model.cfg.max_position_embeddings or model.cfg.seq_length
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], device=device)
        logits = model(tokens=context)[0, -1].float().cpu()
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        logits = logits / max(temperature, 1e-5)
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    model.train(was_training)
    return ids


def load_for_generation(run_dir: str, checkpoint: str | None = None
                        ) -> tuple[GPTModel, object, str]:
    """The newest checkpoint of ``run_dir`` (or the ``checkpoint`` directory given) as
    one whole model, whatever layout wrote it.

    Parameter names are global, so a pipeline- or tensor-parallel checkpoint loads
    into one process (DCP reshards); the vocabulary keeps the padding it was
    trained with, and a head the schedule untied stays untied.
    """
    import os

    import yaml

    from megatron_paci.checkpoint.format import latest_checkpoint, load_checkpoint, read_meta
    from megatron_paci.config import config_from_dict
    from megatron_paci.data.tokenizer import build_tokenizer
    from megatron_paci.pipeline.registry import get_schedule
    from megatron_paci.training.trainer import resolve_vocab_size

    path = checkpoint or latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir}/checkpoints")
    meta = read_meta(path)
    with open(os.path.join(path, "config.yaml")) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    layout = meta.get("layout", {})
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = resolve_vocab_size(cfg, tokenizer.vocab_size, layout.get("tensor", 1))
    model_cfg = get_schedule(meta.get("schedule", cfg.pipeline.schedule)).stage_model_config(
        cfg.model, layout.get("pipeline", 1))
    model = GPTModel(model_cfg, vocab, seed=cfg.train.seed)
    load_checkpoint(path, {"model": model.state_dict()})
    return model, tokenizer, path


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_paci.training.generate --run-dir DIR --prompt TEXT``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m megatron_paci.training.generate",
                                description="Sample text from a run's newest checkpoint.")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model, tokenizer, path = load_for_generation(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tokenizer.tokenize(args.prompt) if args.prompt else [tokenizer.eod]
    out = sample(model, ids, args.tokens, args.temperature, args.top_k,
                 vocab_limit=tokenizer.vocab_size, seed=args.seed)
    text = tokenizer.detokenize(out if args.prompt else out[1:])
    print(f"----- sample from {path} (prompt: {args.prompt!r}) -----\n{text}\n-----")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
