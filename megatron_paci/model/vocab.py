"""The model's padded vocabulary, shared by training and generation."""

from __future__ import annotations

from megatron_paci.config.loader import ConfigError
from megatron_paci.config.schema import Config
from megatron_paci.model.gpt import padded_vocab_size


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int, tensor_parallel: int) -> int:
    """Padded model vocabulary; refuses a tokenizer that does not fit the model."""
    if cfg.model.vocab_size is not None and tokenizer_vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.data.tokenizer} has {tokenizer_vocab} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size or retrain "
            "the tokenizer with a smaller vocabulary"
        )
    return padded_vocab_size(
        cfg.model.vocab_size or tokenizer_vocab, cfg.model.make_vocab_size_divisible_by,
        tensor_parallel,
    )
