"""GPT built from config; one instance is one pipeline stage (a layer range).

Layers are keyed by their global index (``layers.7.attn.qkv.weight``), so a
stage holding layers 4..7 names its parameters exactly as the full model does:
checkpoints move between pipeline layouts by name. Each parameter is
initialised as the FULL tensor from a generator seeded by (seed, parameter
name), and a tensor-parallel rank keeps its shard of it, so every stage split
and every tp size starts from the weights of the one-process model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from megatron_paci.config.schema import ModelConfig
from megatron_paci.model.transformer import (
    OUTPUT_PROJECTIONS,
    LayerContext,
    RotaryEmbedding,
    TransformerLayer,
    make_layer_norm,
    output_projection_std,
)
from megatron_paci.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    parallel_lm_logits,
    scatter_to_sequence_parallel_region,
    set_tp_attributes,
    shard_of,
)

WORD_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int = 1) -> int:
    """Megatron pads the vocabulary so every tp shard is a multiple of ``divisible_by``."""
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model this process holds."""

    first_layer: int
    last_layer: int  # exclusive
    pre_process: bool  # holds the embedding (in its first chunk)
    post_process: bool  # holds final norm, head and loss (in its last chunk)
    # Layer ranges of the model chunks (virtual stages) this rank runs one at a time;
    # empty for the one chunk [first_layer, last_layer).
    chunks: tuple[tuple[int, int], ...] = ()

    @staticmethod
    def whole(num_layers: int) -> StageSpec:
        return StageSpec(0, num_layers, True, True)

    @staticmethod
    def of_chunks(ranges: list[tuple[int, int]], pre_process: bool,
                  post_process: bool) -> StageSpec:
        ranges = [tuple(r) for r in ranges]
        return StageSpec(ranges[0][0], ranges[-1][1], pre_process, post_process,
                         tuple(ranges) if len(ranges) > 1 else ())

    @property
    def chunk_ranges(self) -> tuple[tuple[int, int], ...]:
        return self.chunks or ((self.first_layer, self.last_layer),)

    def layer_indices(self) -> list[int]:
        return [i for first, last in self.chunk_ranges for i in range(first, last)]

    def describe(self) -> str:
        """``4-7`` or, for several chunks, ``2-3, 6-7`` (``5`` for a one-layer range)."""
        return ", ".join(f"{a}" if b - 1 == a else f"{a}-{b - 1}" for a, b in self.chunk_ranges)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, tp: LayerContext):
        super().__init__()
        self.tp = tp
        self.word_embeddings = VocabParallelEmbedding(vocab_size, cfg.hidden_size, group=tp.group)
        self.position_embeddings = None
        if cfg.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(
                cfg.max_position_embeddings or cfg.seq_length, cfg.hidden_size)
            set_tp_attributes(self.position_embeddings.weight, None)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [b, s] -> [s, b, h] (or [s/tp, b, h] with sequence parallelism)."""
        ids = tokens.t()
        x = self.word_embeddings(ids)
        if self.position_embeddings is not None:
            positions = torch.arange(ids.shape[0], device=ids.device)
            x = x + self.position_embeddings(positions)[:, None, :]
        if self.tp.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.tp.group)
            with self.tp.fork_rng():
                return self.dropout(x)
        return self.dropout(x)


class GPTModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        stage: StageSpec | None = None,
        seed: int = 1234,
        tp: LayerContext | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.stage = stage or StageSpec.whole(cfg.num_layers)
        self.tp = tp or LayerContext()
        if vocab_size % self.tp.size:
            raise ValueError(f"padded vocabulary {vocab_size} is not divisible by "
                             f"parallel.tensor={self.tp.size}")
        self.embedding = Embedding(cfg, vocab_size, self.tp) if self.stage.pre_process else None
        self.layers = nn.ModuleDict(
            {str(i): TransformerLayer(cfg, self.tp)
             for i in self.stage.layer_indices()}
        )
        self.rotary = (
            RotaryEmbedding(cfg.hidden_size // cfg.num_attention_heads, cfg.rotary_base)
            if cfg.position_embedding == "rope"
            else None
        )
        self.final_norm = None
        self.output_layer = None
        if self.stage.post_process:
            self.final_norm = make_layer_norm(cfg, self.tp)
            if not (cfg.tie_embeddings and self.stage.pre_process):
                # Untied head, or a last stage apart from the embedding: its own copy.
                self.output_layer = ColumnParallelLinear(cfg.hidden_size, vocab_size,
                                                         bias=False, group=self.tp.group)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Megatron's init on the full tensor, from a (seed, name) generator; keep my shard."""
        for name, p in self.named_parameters():
            dim = getattr(p, "tensor_parallel_dim", None)
            full_shape = list(p.shape)
            if dim is not None:
                full_shape[dim] *= self.tp.size
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
                key = WORD_EMBEDDING if (name == OUTPUT_LAYER
                                         and self.cfg.tie_embeddings) else name
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                full = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std,
                                                                            generator=gen)
                p.copy_(shard_of(full, dim, self.tp.rank, self.tp.size))

    def chunk_parameters(self, chunk: int) -> list[tuple[str, nn.Parameter]]:
        """The named parameters model chunk ``chunk`` uses: its layers, plus the
        embedding in the first chunk and final norm and head in the last (what one
        chunk's own optimizer step updates)."""
        ranges = self.stage.chunk_ranges
        if not 0 <= chunk < len(ranges):
            raise ValueError(f"chunk {chunk} out of range: this rank holds {len(ranges)}")
        first, last = ranges[chunk]
        owned = {f"layers.{i}." for i in range(first, last)}
        if chunk == 0:
            owned.add("embedding.")
        if chunk == len(ranges) - 1:
            owned |= {"final_norm.", "output_layer."}
        return [(n, p) for n, p in self.named_parameters()
                if any(n.startswith(prefix) for prefix in owned)]

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
        chunk: int = 0,
    ) -> torch.Tensor:
        """First stage takes ``tokens`` [b, s], later stages the previous stage's ``hidden``.

        Returns hidden states [s, b, h] on non-last stages, logits [b, s, V/tp] on the
        last stage without ``labels``, and the per-token loss [b, s] with them. A rank
        holding several model chunks runs one, ``chunk``, per call: the first chunk is
        the first stage's when the rank holds the embedding, the last the last stage's.
        """
        ranges = self.stage.chunk_ranges
        pre = self.stage.pre_process and chunk == 0
        post = self.stage.post_process and chunk == len(ranges) - 1
        if pre:
            assert tokens is not None, "the first stage needs tokens"
            x = self.embedding(tokens)
        else:
            assert hidden is not None, "a later stage needs the previous stage's hidden states"
            x = hidden
        rotary = None
        if self.rotary is not None:
            seq = x.shape[0] * (self.tp.size if self.tp.sequence_parallel else 1)
            rotary = self.rotary(seq, x.device)
        first, last = ranges[chunk]
        for i in range(first, last):
            x = self.layers[str(i)](x, rotary)
        if not post:
            return x
        x = self.final_norm(x)
        logits = parallel_lm_logits(x, self.head_weight(), self.tp.group,
                                    self.tp.sequence_parallel)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1)
        # Nothing else holds the logits, so a fused kernel may write their gradient
        # into their own storage (one logits-sized buffer at the peak).
        return self.tp.kernels.cross_entropy(logits, labels.t(), self.tp.group,
                                             inplace_backward=True).t()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
