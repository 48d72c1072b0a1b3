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
