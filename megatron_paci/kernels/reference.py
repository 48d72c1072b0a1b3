"""Plain-torch references of every fused op: the ``torch`` backend and the ground
truth the Triton kernels are tested and parity-checked against.

Shapes follow the model: activations ``[..., hidden]``; rotary inputs
``[b, heads, s, head_dim]`` with ``cos``/``sin`` ``[s, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """Output in ``x``'s dtype, as the Triton and apex kernels give it.

    bf16 ``x`` with fp32 weights (outside autocast, as the parity check calls it) is
    normalised in fp32: CUDA's layer_norm refuses mixed dtypes where the CPU's accepts
    them.
    """
    if x.dtype != weight.dtype:
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                            None if bias is None else bias.float(), eps).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GeLU (tanh approximation, as GPT-2 and Megatron use) of ``x + bias``."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                     p: float, training: bool) -> torch.Tensor:
    """``residual + dropout(x + bias)``: the residual branch after attention and MLP."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=p, training=training)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension (GPT-NeoX / Megatron layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss in fp32 (``logits`` ``[..., V]``, ``target`` ``[...]``)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           reduction="none").view(target.shape)
