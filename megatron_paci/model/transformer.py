"""Pre-LayerNorm transformer block in the Megatron form, tensor-parallel aware.

Activations are ``[seq, batch, hidden]`` (Megatron's layout: sequence
parallelism splits dim 0, contiguous). Attention heads and the MLP's inner
dimension are split across tensor-parallel ranks by column/row-parallel
linears; with ``group=None`` they are plain linears.

``model.recompute`` (Megatron's activation recomputation): ``full`` keeps only each
layer's input and runs the layer's forward again at its backward; ``selective`` does
that for the attention core alone, softmax(QK^T)V, whose s x s scores are the largest
saved tensor when they are stored at all. Both go through ``torch.utils.checkpoint``
(non-reentrant), which replays the default RNG; ``_replay_tracker`` replays the
tensor-parallel RNG streams too, so a recomputed dropout draws the forward's mask. A
recomputed layer runs on the weight tensors its forward saw: the live parameters
(updated in place, so the recompute sees their values at backward time) or
PipeDream-2BW's immutable snapshot (see docs/pipeline.md, "Activation recomputation").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

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


def _replay_tracker(rng: RNGTracker | None) -> Callable[[], tuple]:
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute draws from the
    tracker's streams as the forward found them, and leaves them as it found them
    (later forwards have moved them on since)."""

    def contexts() -> tuple:
        if rng is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        at_forward = rng.get_states()

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            now = rng.get_states()
            rng.set_states(at_forward)
            try:
                yield
            finally:
                rng.set_states(now)

        return contextlib.nullcontext(), recompute()

    return contexts


def _recomputing(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


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


def skipped_bias(linear: nn.Module) -> torch.Tensor | None:
    """The bias a ``skip_bias_add`` linear left for the next op to add (None if it added
    its own)."""
    return linear.bias if linear.skip_bias_add else None


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
        self.recompute_core = cfg.recompute == "selective"
        # qkv rows are laid out [heads, (q, k, v), head_dim], so a contiguous
        # column-parallel shard holds whole heads.
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, group=tp.group,
                                        sequence_parallel=tp.sequence_parallel)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, group=tp.group,
                                      sequence_parallel=tp.sequence_parallel,
                                      skip_bias_add=tp.kernels.fuses_bias("bias_dropout_add"))

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
        p = self.attention_dropout if self.training else 0.0
        if self.recompute_core and _recomputing(self):
            out = checkpoint(self._core, q, k, v, p, use_reentrant=False,
                             context_fn=_replay_tracker(self.tp.rng))
        else:
            out = self._core(q, k, v, p)
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        return self.proj(out)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              dropout_p: float) -> torch.Tensor:
        """softmax(QK^T / sqrt(d)) V, causal: what ``model.recompute=selective`` reruns."""
        with self.tp.fork_rng():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: LayerContext):
        super().__init__()
        if ffn_size(cfg) % tp.size:
            raise ValueError(f"FFN size {ffn_size(cfg)} is not divisible by "
                             f"parallel.tensor={tp.size}")
        self.kernels = tp.kernels
        # Each bias goes where it costs no extra pass: into the fused op after the GEMM
        # where the kernel adds it (Triton), into the GEMM itself otherwise (addmm).
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, ffn_size(cfg), group=tp.group,
                                        sequence_parallel=tp.sequence_parallel,
                                        skip_bias_add=tp.kernels.fuses_bias("bias_gelu"))
        self.fc2 = RowParallelLinear(ffn_size(cfg), cfg.hidden_size, group=tp.group,
                                     sequence_parallel=tp.sequence_parallel,
                                     skip_bias_add=tp.kernels.fuses_bias("bias_dropout_add"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output without fc2's bias where fc2 skips it (the caller fuses it with dropout
        and the residual: ``skipped_bias``)."""
        return self.fc2(self.kernels.bias_gelu(self.fc1(x), skipped_bias(self.fc1)))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: LayerContext):
        super().__init__()
        self.tp = tp
        self.ln1 = make_layer_norm(cfg, tp)
        self.attn = SelfAttention(cfg, tp)
        self.ln2 = make_layer_norm(cfg, tp)
        self.mlp = MLP(cfg, tp)
        self.dropout = cfg.dropout
        self.recompute = cfg.recompute == "full"

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
        if self.recompute and _recomputing(self):
            # The tensors this forward reads: the parameters, or a snapshot a policy put
            # in their place (torch.func.functional_call). The recompute reads the same.
            weights = {f"layer.{n}": w for n, w in self.named_parameters()}
            return checkpoint(self._on_weights, weights, x, rotary, use_reentrant=False,
                              context_fn=_replay_tracker(self.tp.rng))
        return self._layer(x, rotary)

    def _on_weights(self, weights: dict[str, torch.Tensor], x: torch.Tensor,
                    rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return functional_call(_OnWeights(self), weights, (x, rotary))

    def _layer(self, x: torch.Tensor,
               rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = self._bias_dropout_add(self.attn(self.ln1(x), rotary), skipped_bias(self.attn.proj),
                                   x)
        return self._bias_dropout_add(self.mlp(self.ln2(x)), skipped_bias(self.mlp.fc2), x)


class _OnWeights(nn.Module):
    """A layer as a child, so ``functional_call`` can run it on given weight tensors (at
    the recompute the layer's attributes are its parameters again, whatever the forward
    ran on)."""

    def __init__(self, layer: TransformerLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return self.layer._layer(x, rotary)


# Parameters whose output feeds the residual stream: Megatron scales their init
# by 1/sqrt(2 * num_layers) so the residual variance does not grow with depth.
OUTPUT_PROJECTIONS = ("attn.proj.weight", "mlp.fc2.weight")


def output_projection_std(cfg: ModelConfig) -> float:
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
