"""Which weights a backward pending across an in-place update (PACI's B(j) after a
STEP) uses, in fp32 and under bf16 autocast, on the project's own layers.

- fp32: a Linear's input gradient uses the live (updated) weight.
- bf16 autocast: autocast casts the weight to bf16 at the forward and saves that
  copy, so the input gradient uses the forward-time weight, rounded to bf16; the
  update does not reach it.
- Both: the weight gradient uses the activations saved at the forward.
- LayerNorm gains (and anything autocast does not cast) stay live under autocast.
- One autocast region caches its casts: a forward after the update inside the same
  region still gets the old bf16 copy, which is why the executor opens one per forward.

Every reference is a hand computation on explicit tensors (docs/schedules/paci.md, "bf16").
"""

import contextlib

import torch

from megatron_paci.kernels import reference
from megatron_paci.tensor_parallel.layers import ColumnParallelLinear

BF16 = torch.bfloat16


def _bf16_autocast():
    return torch.autocast("cpu", dtype=BF16)


def _linear():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(8, 6, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 8))
        layer.bias.copy_(torch.randn(6))
    return layer


def _pending_backward(layer, autocast):
    """F at the current weights, an in-place update through ``.data`` (as the
    optimizer's aliases do), then the pending B. Returns (x, g, old W, new W)."""
    x = torch.randn(5, 8, requires_grad=True)
    g = torch.randn(5, 6)
    w_old = layer.weight.detach().clone()
    with autocast():
        y = layer(x)
    layer.weight.data.add_(torch.randn(6, 8))  # a large update: the versions differ
    w_new = layer.weight.detach().clone()
    (y.float() * g).sum().backward()
    return x, g, w_old, w_new


def test_linear_in_fp32_takes_the_input_gradient_at_the_live_weight():
    layer = _linear()
    x, g, w_old, w_new = _pending_backward(layer, contextlib.nullcontext)
    torch.testing.assert_close(x.grad, g @ w_new, rtol=1e-6, atol=1e-6)
    assert (x.grad - g @ w_old).abs().max() > 0.5
    torch.testing.assert_close(layer.weight.grad, g.t() @ x.detach(), rtol=1e-6, atol=1e-6)


def test_linear_under_bf16_autocast_takes_it_at_the_forward_time_bf16_copy():
    layer = _linear()
    x, g, w_old, w_new = _pending_backward(layer, _bf16_autocast)
    # The output is bf16, so its gradient arrives as bf16(g); dx = bf16(g) @ bf16(W_old),
    # computed in bf16, handed back to the fp32 input as fp32. Bit for bit.
    at_forward = (g.to(BF16) @ w_old.to(BF16)).float()
    assert torch.equal(x.grad, at_forward)
    assert (x.grad - (g.to(BF16) @ w_new.to(BF16)).float()).abs().max() > 0.5
    # The weight gradient: bf16(g)^T @ bf16(x), the activation saved at the forward.
    assert torch.equal(layer.weight.grad, (g.to(BF16).t() @ x.detach().to(BF16)).float())


def _layer_norm_grad(x, gain, dy):
    """d/dx of sum(dy * LN(x; gain)), by hand in float64 (no bias: it drops out)."""
    x, gain, dy = x.double(), gain.double(), dy.double()
    mu = x.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    xhat = (x - mu) * rstd
    d = dy * gain
    return rstd * (d - d.mean(-1, keepdim=True) - xhat * (d * xhat).mean(-1, keepdim=True))


def test_layer_norm_gains_stay_live_under_bf16_autocast():
    torch.manual_seed(1)
    gain = torch.nn.Parameter(torch.randn(8))
    bias = torch.nn.Parameter(torch.randn(8))
    for dtype in (torch.float32, BF16):  # the residual stream, or a bf16 matmul output
        x = torch.randn(5, 8).to(dtype).requires_grad_(True)
        dy = torch.randn(5, 8)
        old = gain.detach().clone()
        with _bf16_autocast():
            y = reference.layer_norm(x, gain, bias, 1e-5)
        gain.data.mul_(-2.0)
        (y.float() * dy).sum().backward()
        live = _layer_norm_grad(x.detach(), gain.detach(), dy)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 rounding of x and of dx
        assert (x.grad.double() - live).abs().max() < tol * live.abs().max()
        assert (x.grad.double() - _layer_norm_grad(x.detach(), old, dy)).abs().max() > 0.5


def test_one_autocast_region_keeps_its_bf16_copy_across_an_update():
    layer = _linear()
    x = torch.randn(3, 8)
    with _bf16_autocast():
        before = layer(x)
        layer.weight.data.mul_(2.0)
        inside = layer(x)
    with _bf16_autocast():
        after = layer(x)
    assert torch.equal(inside, before)  # the cached cast of the old weight
    w2 = layer.weight.detach().to(BF16)
    assert torch.equal(after, torch.nn.functional.linear(x.to(BF16), w2,
                                                         layer.bias.detach().to(BF16)))
