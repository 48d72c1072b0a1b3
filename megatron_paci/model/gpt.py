"""GPT built from config; one instance is one pipeline stage (a layer range).

Layers are keyed by their global index (``layers.7.attn.qkv.weight``), so a
stage holding layers 4..7 names its parameters exactly as the full model does:
checkpoints move between pipeline layouts by name. Each parameter is
initialised from a generator seeded by (seed, parameter name), so any stage
split, and later any tensor-parallel split, starts from the weights of the
one-process model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_paci.config.schema import ModelConfig
from megatron_paci.model.transformer import (
    OUTPUT_PROJECTIONS,
    RotaryEmbedding,
    TransformerLayer,
    output_projection_std,
)

WORD_EMBEDDING = "embedding.word_embeddings.weight"


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Megatron pads the vocabulary so every tp shard is a multiple of ``divisible_by``."""
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model this process holds."""

    first_layer: int
    last_layer: int  # exclusive
    pre_process: bool  # holds the embedding
    post_process: bool  # holds final norm, head and loss

    @staticmethod
    def whole(num_layers: int) -> StageSpec:
        return StageSpec(0, num_layers, True, True)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position_embeddings = (
            nn.Embedding(cfg.max_position_embeddings or cfg.seq_length, cfg.hidden_size)
            if cfg.position_embedding == "learned"
            else None
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.position_embeddings(positions)
        return self.dropout(x)


class GPTModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        stage: StageSpec | None = None,
        seed: int = 1234,
    ):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.stage = stage or StageSpec.whole(cfg.num_layers)
        self.embedding = Embedding(cfg, vocab_size) if self.stage.pre_process else None
        self.layers = nn.ModuleDict(
            {str(i): TransformerLayer(cfg) for i in range(self.stage.first_layer,
                                                          self.stage.last_layer)}
        )
        self.rotary = (
            RotaryEmbedding(cfg.hidden_size // cfg.num_attention_heads, cfg.rotary_base)
            if cfg.position_embedding == "rope"
            else None
        )
        self.final_norm = None
        self.output_layer = None
        if self.stage.post_process:
            self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
            if not (cfg.tie_embeddings and self.stage.pre_process):
                # Untied head, or a last stage apart from the embedding: its own copy.
                self.output_layer = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Megatron's init, each tensor from its own (seed, name) generator."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                    continue
                if ".ln" in name or name.startswith("final_norm"):
                    p.fill_(1.0)
                    continue
                std = self.cfg.init_std
                if name.endswith(OUTPUT_PROJECTIONS):
                    std = output_projection_std(self.cfg)
                # A tied head's copy on another stage starts equal to the embedding.
                key = WORD_EMBEDDING if (name == "output_layer.weight"
                                         and self.cfg.tie_embeddings) else name
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                full = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                p.copy_(full)

    def head_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        assert self.embedding is not None
        return self.embedding.word_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """First stage takes ``tokens``, later stages the previous stage's ``hidden``.

        Returns hidden states on non-last stages, logits on the last stage
        without ``labels``, and the per-token loss ``[b, s]`` with them.
        """
        if self.stage.pre_process:
            assert tokens is not None, "the first stage needs tokens"
            x = self.embedding(tokens)
        else:
            assert hidden is not None, "a later stage needs the previous stage's hidden states"
            x = hidden
        rotary = self.rotary(x.shape[1], x.device) if self.rotary is not None else None
        for layer in self.layers.values():
            x = layer(x, rotary)
        if not self.stage.post_process:
            return x
        x = self.final_norm(x)
        logits = F.linear(x, self.head_weight())
        if labels is None:
            return logits
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        ).view_as(labels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
