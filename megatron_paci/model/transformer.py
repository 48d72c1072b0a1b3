"""Pre-LayerNorm transformer block in the Megatron form, tensor-parallel aware.

Activations are ``[seq, batch, hidden]`` (Megatron's layout: sequence
parallelism splits dim 0, contiguous). Attention heads and the MLP's inner
dimension are split across tensor-parallel ranks by column/row-parallel
linears; with ``group=None`` they are plain linears.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megatron_paci.config.schema import ModelConfig
from megatron_paci.kernels.dispatch import Kernels, reference_kernels
from megatron_paci.tensor_parallel import (
    ColumnParallelLinear,
    RNGTracker,
    RowParallelLinear,
    set_tp_attributes,
)


def ffn_size(cfg: ModelConfig) -> int:
    return cfg.ffn_hidden_size or 4 * cfg.hidden_size


@dataclass(frozen=True)
class LayerContext:
    """What a layer needs to know: its tensor-parallel group, and which kernel
    implementation runs each fused op (kernels/dispatch.py)."""

    group: object | None = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    rng: RNGTracker | None = None
    kernels: Kernels = field(default_factory=reference_kernels)

    def fork_rng(self):
        """Dropout inside the tp region draws from a per-tp-rank RNG."""
        import contextlib

        return self.rng.fork() if self.rng is not None else contextlib.nullcontext()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), applied to queries and keys."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class LayerNorm(nn.Module):
    """LayerNorm through the dispatcher; parameters named as ``nn.LayerNorm``'s."""

    def __init__(self, hidden: int, eps: float, ctx: LayerContext):
        super().__init__()
        self.eps = eps
        self.kernels = ctx.kernels
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        for p in (self.weight, self.bias):
            # Replicated over tp; under sequence parallelism each rank sees part of
            # the sequence, so its gradient is partial and must be summed over tp.
            set_tp_attributes(p, None, sequence_parallel=ctx.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)


def make_layer_norm(cfg: ModelConfig, ctx: LayerContext) -> LayerNorm:
    return LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, ctx)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: LayerContext):
        super().__init__()
        if cfg.num_attention_heads % tp.size:
            raise ValueError(f"model.num_attention_heads={cfg.num_attention_heads} is not "
                             f"divisible by parallel.tensor={tp.size}")
        self.tp = tp
        self.local_heads = cfg.num_attention_heads // tp.size
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.attention_dropout = cfg.attention_dropout
        # qkv rows are laid out [heads, (q, k, v), head_dim], so a contiguous
        # column-parallel shard holds whole heads.
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, group=tp.group,
                                        sequence_parallel=tp.sequence_parallel)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, group=tp.group,
                                      sequence_parallel=tp.sequence_parallel,
                                      skip_bias_add=True)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        qkv = self.qkv(x)  # [s, b, local_heads * 3 * d] (full sequence)
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 1, 2, 0, 4)  # each [b, heads, s, d]
        if rotary is not None:
            rope = self.tp.kernels.rotary
            q, k = rope(q.contiguous(), *rotary), rope(k.contiguous(), *rotary)
        with self.tp.fork_rng():
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True,
                dropout_p=self.attention_dropout if self.training else 0.0,
            )
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        return self.proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: LayerContext):
        super().__init__()
        if ffn_size(cfg) % tp.size:
            raise ValueError(f"FFN size {ffn_size(cfg)} is not divisible by "
                             f"parallel.tensor={tp.size}")
        self.kernels = tp.kernels
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, ffn_size(cfg), group=tp.group,
                                        sequence_parallel=tp.sequence_parallel,
                                        skip_bias_add=True)
        self.fc2 = RowParallelLinear(ffn_size(cfg), cfg.hidden_size, group=tp.group,
                                     sequence_parallel=tp.sequence_parallel,
                                     skip_bias_add=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output without fc2's bias: the caller fuses it with dropout and the residual."""
        return self.fc2(self.kernels.bias_gelu(self.fc1(x), self.fc1.bias))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: LayerContext):
        super().__init__()
        self.tp = tp
        self.ln1 = make_layer_norm(cfg, tp)
        self.attn = SelfAttention(cfg, tp)
        self.ln2 = make_layer_norm(cfg, tp)
        self.mlp = MLP(cfg, tp)
        self.dropout = cfg.dropout

    def _bias_dropout_add(self, out: torch.Tensor, bias: torch.Tensor,
                          residual: torch.Tensor) -> torch.Tensor:
        # With sequence parallelism each tp rank holds different tokens, so the
        # residual dropout masks must differ per rank; without it they must agree.
        fused = self.tp.kernels.bias_dropout_add
        if self.tp.sequence_parallel:
            with self.tp.fork_rng():
                return fused(out, bias, residual, self.dropout, self.training)
        return fused(out, bias, residual, self.dropout, self.training)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = self._bias_dropout_add(self.attn(self.ln1(x), rotary), self.attn.proj.bias, x)
        return self._bias_dropout_add(self.mlp(self.ln2(x)), self.mlp.fc2.bias, x)


# Parameters whose output feeds the residual stream: Megatron scales their init
# by 1/sqrt(2 * num_layers) so the residual variance does not grow with depth.
OUTPUT_PROJECTIONS = ("attn.proj.weight", "mlp.fc2.weight")


def output_projection_std(cfg: ModelConfig) -> float:
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
