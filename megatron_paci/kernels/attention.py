"""Which scaled_dot_product_attention backend a run gets, said at start-up.

Attention is torch's ``F.scaled_dot_product_attention``. On a GPU its flash backend
keeps the s x s scores out of memory; when the inputs do not suit it (fp32, a head
size it lacks, a layout it refuses) SDPA falls back to a slower backend without a
word, and only the step time shows it. So the start-up log says which one runs.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def attention_backend(device: torch.device, dtype: torch.dtype, heads: int,
                      head_dim: int) -> str:
    """One line for the start-up log. On CUDA it runs SDPA once, flash only, on q/k/v
    laid out as the model lays them out ([s, b, heads, (q, k, v), d] permuted)."""
    if device.type != "cuda":
        return (f"attention: F.scaled_dot_product_attention on {device.type} "
                "(flash backend checked on CUDA only)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = torch.randn(128, 1, heads, 3, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.permute(3, 1, 2, 0, 4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # SDPA gives its reasons as warnings
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            error = None
        except RuntimeError as e:
            error = e
    if error is not None:
        reasons = [str(w.message) for w in said if "flash" in str(w.message).lower()]
        why = " ".join((reasons[0] if reasons else str(error)).split())[:160]
        return (f"attention: F.scaled_dot_product_attention NOT on the flash backend for "
                f"{dtype}, head dim {head_dim} ({why}); expect slower steps")
    return (f"attention: F.scaled_dot_product_attention, flash backend ({dtype}, "
            f"head dim {head_dim})")
