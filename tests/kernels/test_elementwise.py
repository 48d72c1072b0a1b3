"""Fused Triton element-wise kernels against the plain-torch references.

By default these run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET), so shapes are kept to a few dozen program instances. With
MEGATRON_PACI_TEST_DEVICE=cuda they run the compiled kernels on the GPU
(tests/kernels/conftest.py); inputs are always drawn on the CPU from torch's seeded
default generator and then moved, so both devices see the same values.
bf16 cases compare against the fp32 reference evaluated on the same bf16-rounded
inputs, so the tolerance only has to cover the final rounding to bf16.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from megatron_paci.kernels import reference as ref  # noqa: E402
from megatron_paci.kernels import triton_elementwise as te  # noqa: E402

FP32 = {"rtol": 1e-5, "atol": 1e-5}
# bf16 has an 8-bit mantissa: one rounding is <= 2^-9 relative (~2e-3).
BF16 = {"rtol": 1e-2, "atol": 1e-2}
SHAPES = [(3, 5, 40), (4, 64), (7, 33), (2, 1, 1)]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _rand(dev: torch.device, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal drawn on the CPU (seeded by torch.manual_seed), moved to ``dev``."""
    return torch.randn(*shape).to(device=dev, dtype=dtype)


# --------------------------------------------------------------------------- bias + GeLU


def _check_bias_gelu(x: torch.Tensor, b: torch.Tensor, tol: dict) -> None:
    g = _rand(x.device, *x.shape, dtype=x.dtype)
    xk, bk = _leaf(x), _leaf(b)
    y = te.bias_gelu(xk, bk)
    y.backward(g)
    xr, br = _leaf(x.float()), _leaf(b.float())
    yr = ref.bias_gelu(xr, br)
    yr.backward(g.float())
    assert y.dtype == x.dtype and y.shape == x.shape
    assert xk.grad.dtype == x.dtype and bk.grad.dtype == b.dtype
    torch.testing.assert_close(y.float(), yr, **tol)
    torch.testing.assert_close(xk.grad.float(), xr.grad, **tol)
    # dbias is an fp32 sum of fp32 per-element grads: only the final rounding differs
    torch.testing.assert_close(bk.grad.float(), br.grad, **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_fp32(shape, kernel_device):
    torch.manual_seed(0)
    _check_bias_gelu(_rand(kernel_device, *shape), _rand(kernel_device, shape[-1]), FP32)


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 33)])
def test_bias_gelu_bf16(shape, bias_dtype, kernel_device):
    torch.manual_seed(1)
    _check_bias_gelu(_rand(kernel_device, *shape, dtype=torch.bfloat16),
                     _rand(kernel_device, shape[-1], dtype=bias_dtype), BF16)


def test_bias_gelu_large_values_and_noncontiguous(kernel_device):
    """Saturated tanh (|u| large) must not produce NaN; strided x is accepted."""
    torch.manual_seed(2)
    x = (_rand(kernel_device, 40, 6) * 30).t()  # [6, 40], non-contiguous
    assert not x.is_contiguous()
    _check_bias_gelu(x, _rand(kernel_device, 40), FP32)


def test_bias_gelu_multi_block_reduction(monkeypatch, kernel_device):
    """Several column blocks and several row blocks per program in the dbias reduction."""
    monkeypatch.setattr(te, "_MAX_BLOCK_N", 16)
    monkeypatch.setattr(te, "_TILE_ELEMS", 64)
    monkeypatch.setattr(te, "_max_programs", lambda device: 6)
    torch.manual_seed(3)
    _check_bias_gelu(_rand(kernel_device, 37, 45), _rand(kernel_device, 45), FP32)


def test_bias_gelu_without_bias_is_gelu(kernel_device):
    """``bias=None`` (the signature every backend shares) is GeLU of ``x`` alone."""
    torch.manual_seed(4)
    x = _rand(kernel_device, 7, 33)
    xk, xr = _leaf(x), _leaf(x)
    g = _rand(kernel_device, 7, 33)
    te.bias_gelu(xk, None).backward(g)
    torch.nn.functional.gelu(xr, approximate="tanh").backward(g)
    torch.testing.assert_close(te.bias_gelu(x, None), ref.bias_gelu(x, None), **FP32)
    torch.testing.assert_close(xk.grad, xr.grad, **FP32)


# --------------------------------------------------------------------------- bias + dropout + add


def _bda_grads(x, b, r, p, training, seed, g):
    xk, rk = _leaf(x), _leaf(r)
    bk = None if b is None else _leaf(b)
    out = te.bias_dropout_add(xk, bk, rk, p, training, seed=seed)
    out.backward(g)
    return out.detach(), xk.grad, None if bk is None else bk.grad, rk.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p,training", [(0.0, True), (0.3, False)])
def test_bda_no_dropout_is_exact(shape, p, training, kernel_device):
    torch.manual_seed(4)
    dev = kernel_device
    x, b, r, g = _rand(dev, *shape), _rand(dev, shape[-1]), _rand(dev, *shape), _rand(dev, *shape)
    out, dx, db, dr = _bda_grads(x, b, r, p, training, None, g)
    # same fp32 ops in the same order as the reference: bitwise equal
    assert torch.equal(out, ref.bias_dropout_add(x, b, r, p, training))
    assert torch.equal(out, x + b + r)
    assert torch.equal(dx, g) and torch.equal(dr, g)
    torch.testing.assert_close(db, g.reshape(-1, shape[-1]).sum(0), **FP32)


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32])
def test_bda_no_dropout_bf16(bias_dtype, kernel_device):
    torch.manual_seed(5)
    shape, dev = (3, 5, 40), kernel_device
    x, r = _rand(dev, *shape, dtype=torch.bfloat16), _rand(dev, *shape, dtype=torch.bfloat16)
    b, g = _rand(dev, 40, dtype=bias_dtype), _rand(dev, *shape, dtype=torch.bfloat16)
    out, dx, db, dr = _bda_grads(x, b, r, 0.1, False, None, g)
    expect = ref.bias_dropout_add(x.float(), b.float(), r.float(), 0.1, False)
    assert out.dtype == torch.bfloat16 and db.dtype == bias_dtype
    torch.testing.assert_close(out.float(), expect, **BF16)
    assert torch.equal(dx, g) and torch.equal(dr, g)
    torch.testing.assert_close(db.float(), g.float().reshape(-1, 40).sum(0), **BF16)


def test_bda_no_bias(kernel_device):
    torch.manual_seed(6)
    x, r, g = (_rand(kernel_device, 4, 64) for _ in range(3))
    out, dx, db, dr = _bda_grads(x, None, r, 0.0, True, None, g)
    assert db is None and torch.equal(out, x + r) and torch.equal(dx, g)


def _nonzero(dev: torch.device, *shape: int) -> torch.Tensor:
    """Values bounded away from 0, so a kept element always changes the residual."""
    return (torch.sign(torch.randn(*shape)) * (0.5 + torch.rand(*shape))).to(dev)


@pytest.mark.parametrize("seed", [1234, None])
@pytest.mark.parametrize("shape", [(3, 5, 40), (64, 64), (7, 33)])
def test_bda_mask_same_in_forward_and_backward(shape, seed, kernel_device):
    torch.manual_seed(7)
    p, dev = 0.5, kernel_device
    x, r, g = _nonzero(dev, *shape), _rand(dev, *shape), _rand(dev, *shape)
    b = torch.zeros(shape[-1], device=dev)
    out, dx, db, dr = _bda_grads(x, b, r, p, True, seed, g)
    mask = (out - r) != 0
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(out, r + mask * x / (1 - p), **FP32)
    torch.testing.assert_close(dx, g * mask / (1 - p), **FP32)
    torch.testing.assert_close(db, dx.reshape(-1, shape[-1]).sum(0), **FP32)
    assert torch.equal(dr, g)


def test_bda_multi_block_reduction(monkeypatch, kernel_device):
    """Mask offsets and dbias partials across column blocks and looped row blocks."""
    monkeypatch.setattr(te, "_MAX_BLOCK_N", 16)
    monkeypatch.setattr(te, "_TILE_ELEMS", 64)
    monkeypatch.setattr(te, "_max_programs", lambda device: 6)
    torch.manual_seed(13)
    shape, p, dev = (37, 45), 0.4, kernel_device
    x, r, g = _nonzero(dev, *shape), _rand(dev, *shape), _rand(dev, *shape)
    out, dx, db, dr = _bda_grads(x, torch.zeros(45, device=dev), r, p, True, 3, g)
    mask = (out - r) != 0
    torch.testing.assert_close(dx, g * mask / (1 - p), **FP32)
    torch.testing.assert_close(db, dx.sum(0), **FP32)
    # the mask depends only on (seed, element offset), not on the tiling
    monkeypatch.undo()
    assert torch.equal(te.bias_dropout_add(x, None, r, p, True, seed=3), out)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bda_kept_fraction(p, kernel_device):
    n = 64 * 64
    x, r = _nonzero(kernel_device, 64, 64), torch.zeros(64, 64, device=kernel_device)
    out = te.bias_dropout_add(x, None, r, p, True, seed=99)
    kept = (out != 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 4 * sigma, (kept, 1 - p, sigma)
    # masks differ between rows: the offset, not just the column, feeds the RNG
    rows = out != 0
    assert not all(torch.equal(rows[0], rows[i]) for i in range(1, 64))


def test_bda_seed_determinism(kernel_device):
    torch.manual_seed(8)
    dev = kernel_device
    x, b, r = _rand(dev, 3, 5, 40), _rand(dev, 40), _rand(dev, 3, 5, 40)
    a1 = te.bias_dropout_add(x, b, r, 0.5, True, seed=7)
    a2 = te.bias_dropout_add(x, b, r, 0.5, True, seed=7)
    a3 = te.bias_dropout_add(x, b, r, 0.5, True, seed=8)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)


def test_bda_seed_none_follows_torch_rng(kernel_device):
    dev = kernel_device
    x, b, r = _nonzero(dev, 4, 64), _rand(dev, 64), _rand(dev, 4, 64)
    torch.manual_seed(123)
    a1 = te.bias_dropout_add(x, b, r, 0.5, True)
    state = torch.get_rng_state()
    a2 = te.bias_dropout_add(x, b, r, 0.5, True)
    torch.manual_seed(123)
    assert torch.equal(te.bias_dropout_add(x, b, r, 0.5, True), a1)
    assert not torch.equal(a1, a2)  # successive calls draw new seeds
    # a resumed run restores the RNG state and draws the same mask
    torch.set_rng_state(state)
    assert torch.equal(te.bias_dropout_add(x, b, r, 0.5, True), a2)


def test_bda_bf16_dropout_matches_masked_reference(kernel_device):
    torch.manual_seed(9)
    shape, p, dev = (3, 5, 40), 0.25, kernel_device
    x = _nonzero(dev, *shape).to(torch.bfloat16)
    r = torch.zeros(shape, device=dev, dtype=torch.bfloat16)
    b = torch.zeros(40, device=dev)  # fp32 bias with bf16 x
    g = _rand(dev, *shape, dtype=torch.bfloat16)
    out, dx, db, dr = _bda_grads(x, b, r, p, True, 5, g)
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert db.dtype == torch.float32
    mask = out != 0
    torch.testing.assert_close(out.float(), mask * x.float() / (1 - p), **BF16)
    torch.testing.assert_close(dx.float(), mask * g.float() / (1 - p), **BF16)
    torch.testing.assert_close(db, (mask * g.float() / (1 - p)).reshape(-1, 40).sum(0),
                               **BF16)


def test_bda_p_one_and_bad_p(kernel_device):
    x, r = _rand(kernel_device, 4, 64), _rand(kernel_device, 4, 64)
    assert torch.equal(te.bias_dropout_add(x, None, r, 1.0, True, seed=1), r)
    with pytest.raises(ValueError):
        te.bias_dropout_add(x, None, r, 1.5, True, seed=1)


# --------------------------------------------------------------------------- rotary


def _rope_tables(s: int, d: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin tables, computed on the CPU (same values on every device), moved."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(s).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dev), emb.sin().to(dev)


def _check_rotary(x, cos, sin, tol):
    g = _rand(x.device, *x.shape, dtype=x.dtype)
    xk = _leaf(x)
    y = te.rotary(xk, cos, sin)
    y.backward(g)
    xr = _leaf(x.float())
    yr = ref.rotary(xr, cos, sin)
    yr.backward(g.float())
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), yr, **tol)
    torch.testing.assert_close(xk.grad.float(), xr.grad, **tol)


@pytest.mark.parametrize("tables", ["rope", "arbitrary"])
@pytest.mark.parametrize("shape", [(2, 2, 7, 6), (2, 3, 16, 32), (1, 1, 5, 2), (3, 9, 10)])
def test_rotary_fp32(shape, tables, kernel_device):
    """Backward equals autograd through the reference, for real and arbitrary tables."""
    torch.manual_seed(10)
    s, d, dev = shape[-2], shape[-1], kernel_device
    cos, sin = (_rope_tables(s, d, dev) if tables == "rope"
                else (_rand(dev, s, d), _rand(dev, s, d)))
    _check_rotary(_rand(dev, *shape), cos, sin, FP32)


def test_rotary_bf16(kernel_device):
    torch.manual_seed(11)
    cos, sin = _rope_tables(7, 6, kernel_device)
    _check_rotary(_rand(kernel_device, 2, 2, 7, 6, dtype=torch.bfloat16), cos, sin, BF16)


def test_rotary_noncontiguous(kernel_device):
    torch.manual_seed(12)
    x = _rand(kernel_device, 2, 7, 3, 6).transpose(1, 2)  # [b, s, h, d] -> [b, h, s, d] view
    assert not x.is_contiguous()
    cos, sin = _rope_tables(7, 6, kernel_device)
    _check_rotary(x, cos, sin, FP32)


def test_rotary_rejects_odd_dim(kernel_device):
    dev = kernel_device
    with pytest.raises(ValueError):
        te.rotary(_rand(dev, 1, 1, 4, 5), _rand(dev, 4, 5), _rand(dev, 4, 5))
