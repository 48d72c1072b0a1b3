"""Fused Triton element-wise kernels against the plain-torch references.

On a machine without CUDA these run through Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET), so shapes are kept to a few dozen program instances.
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

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = {"rtol": 1e-5, "atol": 1e-5}
# bf16 has an 8-bit mantissa: one rounding is <= 2^-9 relative (~2e-3).
BF16 = {"rtol": 1e-2, "atol": 1e-2}
SHAPES = [(3, 5, 40), (4, 64), (7, 33), (2, 1, 1)]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEV).to(dtype)


# --------------------------------------------------------------------------- bias + GeLU


def _check_bias_gelu(x: torch.Tensor, b: torch.Tensor, tol: dict) -> None:
    g = _rand(*x.shape, dtype=x.dtype)
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
def test_bias_gelu_fp32(shape):
    torch.manual_seed(0)
    _check_bias_gelu(_rand(*shape), _rand(shape[-1]), FP32)


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 33)])
def test_bias_gelu_bf16(shape, bias_dtype):
    torch.manual_seed(1)
    _check_bias_gelu(_rand(*shape, dtype=torch.bfloat16), _rand(shape[-1], dtype=bias_dtype),
                     BF16)


def test_bias_gelu_large_values_and_noncontiguous():
    """Saturated tanh (|u| large) must not produce NaN; strided x is accepted."""
    torch.manual_seed(2)
    x = (_rand(40, 6) * 30).t()  # [6, 40], non-contiguous
    assert not x.is_contiguous()
    _check_bias_gelu(x, _rand(40), FP32)


def test_bias_gelu_multi_block_reduction(monkeypatch):
    """Several column blocks and several row blocks per program in the dbias reduction."""
    monkeypatch.setattr(te, "_MAX_BLOCK_N", 16)
    monkeypatch.setattr(te, "_TILE_ELEMS", 64)
    monkeypatch.setattr(te, "_MAX_ROW_GROUPS", 6)
    torch.manual_seed(3)
    _check_bias_gelu(_rand(37, 45), _rand(45), FP32)


# --------------------------------------------------------------------------- bias + dropout + add


def _bda_grads(x, b, r, p, training, seed, g):
    xk, rk = _leaf(x), _leaf(r)
    bk = None if b is None else _leaf(b)
    out = te.bias_dropout_add(xk, bk, rk, p, training, seed=seed)
    out.backward(g)
    return out.detach(), xk.grad, None if bk is None else bk.grad, rk.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p,training", [(0.0, True), (0.3, False)])
def test_bda_no_dropout_is_exact(shape, p, training):
    torch.manual_seed(4)
    x, b, r, g = _rand(*shape), _rand(shape[-1]), _rand(*shape), _rand(*shape)
    out, dx, db, dr = _bda_grads(x, b, r, p, training, None, g)
    # same fp32 ops in the same order as the reference: bitwise equal
    assert torch.equal(out, ref.bias_dropout_add(x, b, r, p, training))
    assert torch.equal(out, x + b + r)
    assert torch.equal(dx, g) and torch.equal(dr, g)
    torch.testing.assert_close(db, g.reshape(-1, shape[-1]).sum(0), **FP32)


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32])
def test_bda_no_dropout_bf16(bias_dtype):
    torch.manual_seed(5)
    shape = (3, 5, 40)
    x, r = _rand(*shape, dtype=torch.bfloat16), _rand(*shape, dtype=torch.bfloat16)
    b, g = _rand(40, dtype=bias_dtype), _rand(*shape, dtype=torch.bfloat16)
    out, dx, db, dr = _bda_grads(x, b, r, 0.1, False, None, g)
    expect = ref.bias_dropout_add(x.float(), b.float(), r.float(), 0.1, False)
    assert out.dtype == torch.bfloat16 and db.dtype == bias_dtype
    torch.testing.assert_close(out.float(), expect, **BF16)
    assert torch.equal(dx, g) and torch.equal(dr, g)
    torch.testing.assert_close(db.float(), g.float().reshape(-1, 40).sum(0), **BF16)


def test_bda_no_bias():
    torch.manual_seed(6)
    x, r, g = _rand(4, 64), _rand(4, 64), _rand(4, 64)
    out, dx, db, dr = _bda_grads(x, None, r, 0.0, True, None, g)
    assert db is None and torch.equal(out, x + r) and torch.equal(dx, g)


def _nonzero(*shape: int) -> torch.Tensor:
    """Values bounded away from 0, so a kept element always changes the residual."""
    return torch.sign(_rand(*shape)) * (0.5 + torch.rand(*shape, device=DEV))


@pytest.mark.parametrize("seed", [1234, None])
@pytest.mark.parametrize("shape", [(3, 5, 40), (64, 64), (7, 33)])
def test_bda_mask_same_in_forward_and_backward(shape, seed):
    torch.manual_seed(7)
    p = 0.5
    x, r, g = _nonzero(*shape), _rand(*shape), _rand(*shape)
    b = torch.zeros(shape[-1], device=DEV)
    out, dx, db, dr = _bda_grads(x, b, r, p, True, seed, g)
    mask = (out - r) != 0
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(out, r + mask * x / (1 - p), **FP32)
    torch.testing.assert_close(dx, g * mask / (1 - p), **FP32)
    torch.testing.assert_close(db, dx.reshape(-1, shape[-1]).sum(0), **FP32)
    assert torch.equal(dr, g)


def test_bda_multi_block_reduction(monkeypatch):
    """Mask offsets and dbias partials across column blocks and looped row blocks."""
    monkeypatch.setattr(te, "_MAX_BLOCK_N", 16)
    monkeypatch.setattr(te, "_TILE_ELEMS", 64)
    monkeypatch.setattr(te, "_MAX_ROW_GROUPS", 6)
    torch.manual_seed(13)
    shape, p = (37, 45), 0.4
    x, r, g = _nonzero(*shape), _rand(*shape), _rand(*shape)
    out, dx, db, dr = _bda_grads(x, torch.zeros(45, device=DEV), r, p, True, 3, g)
    mask = (out - r) != 0
    torch.testing.assert_close(dx, g * mask / (1 - p), **FP32)
    torch.testing.assert_close(db, dx.sum(0), **FP32)
    # the mask depends only on (seed, element offset), not on the tiling
    monkeypatch.undo()
    assert torch.equal(te.bias_dropout_add(x, None, r, p, True, seed=3), out)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bda_kept_fraction(p):
    n = 64 * 64
    x, r = _nonzero(64, 64), torch.zeros(64, 64, device=DEV)
    out = te.bias_dropout_add(x, None, r, p, True, seed=99)
    kept = (out != 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 4 * sigma, (kept, 1 - p, sigma)
    # masks differ between rows: the offset, not just the column, feeds the RNG
    rows = out != 0
    assert not all(torch.equal(rows[0], rows[i]) for i in range(1, 64))


def test_bda_seed_determinism():
    torch.manual_seed(8)
    x, b, r = _rand(3, 5, 40), _rand(40), _rand(3, 5, 40)
    a1 = te.bias_dropout_add(x, b, r, 0.5, True, seed=7)
    a2 = te.bias_dropout_add(x, b, r, 0.5, True, seed=7)
    a3 = te.bias_dropout_add(x, b, r, 0.5, True, seed=8)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)


def test_bda_seed_none_follows_torch_rng():
    x, b, r = _nonzero(4, 64), _rand(64), _rand(4, 64)
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


def test_bda_bf16_dropout_matches_masked_reference():
    torch.manual_seed(9)
    shape, p = (3, 5, 40), 0.25
    x = _nonzero(*shape).to(torch.bfloat16)
    r = torch.zeros(shape, device=DEV, dtype=torch.bfloat16)
    b = torch.zeros(40, device=DEV)  # fp32 bias with bf16 x
    g = _rand(*shape, dtype=torch.bfloat16)
    out, dx, db, dr = _bda_grads(x, b, r, p, True, 5, g)
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert db.dtype == torch.float32
    mask = out != 0
    torch.testing.assert_close(out.float(), mask * x.float() / (1 - p), **BF16)
    torch.testing.assert_close(dx.float(), mask * g.float() / (1 - p), **BF16)
    torch.testing.assert_close(db, (mask * g.float() / (1 - p)).reshape(-1, 40).sum(0),
                               **BF16)


def test_bda_p_one_and_bad_p():
    x, r = _rand(4, 64), _rand(4, 64)
    assert torch.equal(te.bias_dropout_add(x, None, r, 1.0, True, seed=1), r)
    with pytest.raises(ValueError):
        te.bias_dropout_add(x, None, r, 1.5, True, seed=1)


# --------------------------------------------------------------------------- rotary


def _rope_tables(s: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    freqs = torch.outer(torch.arange(s, device=DEV).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _check_rotary(x, cos, sin, tol):
    g = _rand(*x.shape, dtype=x.dtype)
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
def test_rotary_fp32(shape, tables):
    """Backward equals autograd through the reference, for real and arbitrary tables."""
    torch.manual_seed(10)
    s, d = shape[-2], shape[-1]
    cos, sin = _rope_tables(s, d) if tables == "rope" else (_rand(s, d), _rand(s, d))
    _check_rotary(_rand(*shape), cos, sin, FP32)


def test_rotary_bf16():
    torch.manual_seed(11)
    cos, sin = _rope_tables(7, 6)
    _check_rotary(_rand(2, 2, 7, 6, dtype=torch.bfloat16), cos, sin, BF16)


def test_rotary_noncontiguous():
    torch.manual_seed(12)
    x = _rand(2, 7, 3, 6).transpose(1, 2)  # [b, s, h, d] -> [b, h, s, d] view
    assert not x.is_contiguous()
    cos, sin = _rope_tables(7, 6)
    _check_rotary(x, cos, sin, FP32)


def test_rotary_rejects_odd_dim():
    with pytest.raises(ValueError):
        te.rotary(_rand(1, 1, 4, 5), _rand(4, 5), _rand(4, 5))
