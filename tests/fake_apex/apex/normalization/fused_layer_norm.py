"""apex's functional fused norms, in plain torch (same signatures)."""

import torch
import torch.nn.functional as F


def fused_layer_norm_affine(input, weight, bias, normalized_shape, eps=1e-6):
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6):
    x = input.float()
    dims = tuple(range(-len(normalized_shape), 0))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return (y * weight).to(input.dtype)
