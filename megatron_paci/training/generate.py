"""Text sampling from a single-stage model, to eyeball what training learned.

The model may be tensor-parallel: then every rank of its tp group calls ``sample``
with the same prompt and seed (the forward runs collectives over that group), and
all of them return the same ids.
"""

from __future__ import annotations

import torch

from megatron_paci.model.gpt import GPTModel
from megatron_paci.parallel import comm
from megatron_paci.tensor_parallel.mappings import gather_from_tensor_parallel_region


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
    tp = model.tp
    # Sequence parallelism splits the context over the tp ranks: pad it on the right
    # (causal attention keeps the real positions blind to the padding).
    multiple = tp.size if tp.sequence_parallel else 1
    window = model.cfg.max_position_embeddings or model.cfg.seq_length
    window -= window % multiple
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = ids[-window:]
        n = len(context)
        context = context + [context[-1]] * (-n % multiple)
        logits = model(tokens=torch.tensor([context], device=device))[0, n - 1]
        logits = gather_from_tensor_parallel_region(logits, tp.group).float().cpu()
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        logits = logits / max(temperature, 1e-5)
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        choice = torch.multinomial(probs, 1, generator=gen).to(device)
        if tp.size > 1:
            # Every tp rank drew from the same logits with the same generator; taking
            # tp rank 0's draw everywhere keeps them in step even if a reduction
            # differed in the last bit.
            choice = choice * int(tp.rank == 0)
            comm.all_reduce(choice, tp.group, "tp")
        ids.append(int(choice))
    model.train(was_training)
    return ids


def load_for_generation(run_dir: str | None, checkpoint: str | None = None
                        ) -> tuple[GPTModel, object, str]:
    """A checkpoint of ``run_dir`` as one whole model (``checkpoint.whole_model``)."""
    from megatron_paci.checkpoint.whole_model import load_whole_model

    return load_whole_model(run_dir, checkpoint)


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_paci.training.generate --run-dir DIR --prompt TEXT``."""
    import argparse
    import sys

    from megatron_paci.checkpoint.format import CheckpointError

    p = argparse.ArgumentParser(
        prog="python -m megatron_paci.training.generate",
        description="Sample text from a run's checkpoint (any tp/pp layout loads into one "
        "process).")
    p.add_argument("--run-dir", help="the run directory (run.dir) whose checkpoints/ to read")
    p.add_argument("--checkpoint", metavar="ITER_OR_DIR",
                   help="an iteration number under RUN_DIR/checkpoints, or a checkpoint "
                   "directory (then --run-dir is not needed); default: the newest")
    p.add_argument("--prompt", default="",
                   help="text to continue (default: start from the end-of-document token)")
    p.add_argument("--tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature; lower is more conservative (default 0.8)")
    p.add_argument("--top-k", type=int, default=40,
                   help="sample among the K most likely tokens; 0 = all (default 40)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = p.parse_args(argv)
    try:
        if args.tokens < 0:
            raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
        model, tokenizer, path = load_for_generation(args.run_dir, args.checkpoint)
        ids = tokenizer.tokenize(args.prompt) if args.prompt else [tokenizer.eod]
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = sample(model, ids, args.tokens, args.temperature, args.top_k,
                 vocab_limit=tokenizer.vocab_size, seed=args.seed)
    text = tokenizer.detokenize(out if args.prompt else out[1:])
    print(f"----- sample from {path} (prompt: {args.prompt!r}) -----\n{text}\n-----")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
