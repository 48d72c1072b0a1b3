"""Triton LayerNorm/RMSNorm against the plain-torch references, forward and backward.

By default these run through Triton's CPU interpreter (set in tests/conftest.py),
which costs ~1 ms per program instance, so shapes stay small: each launch below is at
most 9 programs. With MEGATRON_PACI_TEST_DEVICE=cuda the same inputs (drawn on the CPU,
then moved) go through the compiled kernels on the GPU (tests/kernels/conftest.py).

Tolerances:
- fp32: max error <= 1e-5 * max(1, max|ref|) for the output and every gradient.
- bf16 ``x`` with fp32 weights, against the fp32 reference on the same bf16 inputs:
  output and ``dx`` (stored in bf16) within atol 2e-2 / rtol 1e-2 and within one bf16
  ulp of the fp32 value; ``dweight``/``dbias`` (fp32, accumulated in fp32) within
  1e-3 * max|ref|. To show the bf16 bounds are meaningful, torch's own bf16 path must
  meet the same atol/rtol yet be no closer than a tenth of atol, i.e. the bound is of
  the order of bf16 rounding and not a blanket.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from megatron_paci.kernels import reference, triton_norms  # noqa: E402

OPS = ("layer_norm", "rms_norm")
# (4, 33, 64): 132 rows -> 9 forward tiles and 5 backward blocks of 2 tiles, the last
# one partial, so the partial-sum reduction and row masking are exercised.
SHAPES = [(3, 5, 64), (7, 96), (2, 3, 100), (1, 1, 128), (4, 33, 64)]
EPS = 1e-5


def _inputs(op: str, shape: tuple[int, ...], device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g)
    w = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g) if op == "layer_norm" else None
    dy = torch.randn(shape, generator=g)
    return tuple(None if t is None else t.to(device) for t in (x, w, b, dy))


def _run(fn, x, w, b, dy, eps=EPS):
    """Output and grads (dx, dweight[, dbias]) of ``fn`` on fresh leaves."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    leaves = [x, w]
    if b is not None:
        b = b.detach().requires_grad_()
        leaves.append(b)
        y = fn(x, w, b, eps)
    else:
        y = fn(x, w, eps)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _assert_rel(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = max(1.0, ref.abs().max().item())
    assert _max_err(got, ref) <= tol * scale, (_max_err(got, ref), tol * scale)


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at ``v`` (8 significant bits)."""
    _, e = torch.frexp(v.float())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), e - 8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_fp32_matches_reference(op, shape, kernel_device):
    x, w, b, dy = _inputs(op, shape, kernel_device)
    got = _run(getattr(triton_norms, op), x, w, b, dy)
    ref = _run(getattr(reference, op), x, w, b, dy)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        _assert_rel(g, r, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_bf16_input_fp32_weights(op, shape, kernel_device):
    x, w, b, dy = _inputs(op, shape, kernel_device, seed=1)
    x, dy = x.bfloat16(), dy.bfloat16()
    got = _run(getattr(triton_norms, op), x, w, b, dy)
    ref32 = _run(getattr(reference, op), x.float(), w, b, dy.float())
    # torch's own bf16 path only calibrates the bound (how far plain bf16 arithmetic
    # lands from fp32), so it runs on the CPU whatever the test device: CUDA's
    # F.layer_norm may refuse fp32 weights with a bf16 input.
    cpu = [None if t is None else t.cpu() for t in (x, w, b, dy)]
    ref16 = _run(getattr(reference, op), *cpu)

    y, dx, *wgrads = got
    assert y.dtype == dx.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in wgrads)

    atol, rtol = 2e-2, 1e-2
    for g, r32, r16 in zip((y, dx), ref32[:2], ref16[:2], strict=True):
        torch.testing.assert_close(g.float(), r32, atol=atol, rtol=rtol)
        # One ulp, not half: Triton's interpreter truncates fp32->bf16 (GPUs round).
        assert ((g.float() - r32).abs() <= 1.001 * _bf16_ulp(r32) + 1e-6).all()
        torch.testing.assert_close(r16.float(), r32.cpu(), atol=atol, rtol=rtol)
        assert _max_err(r16, r32.cpu()) > atol / 10
    for g, r32 in zip(wgrads, ref32[2:], strict=True):
        _assert_rel(g, r32, 1e-3)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_input(op, kernel_device):
    x, w, b, dy = _inputs(op, (7, 96), kernel_device, seed=2)
    x3, w3, b3, dy3 = _inputs(op, (8, 6, 64), kernel_device, seed=2)
    cases = [
        (x.t().contiguous().t(), w, b, dy.t().contiguous().t()),  # hidden dim strided
        (x3.transpose(0, 1)[:, ::2], w3, b3, dy3.transpose(0, 1)[:, ::2]),  # leading dims
    ]
    for xv, wv, bv, dyv in cases:
        assert not xv.is_contiguous()
        got = _run(getattr(triton_norms, op), xv, wv, bv, dyv)
        ref = _run(getattr(reference, op), xv, wv, bv, dyv)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            _assert_rel(g, r, 1e-5)


@pytest.mark.parametrize("op", OPS)
def test_eps_is_honoured(op, kernel_device):
    x, w, b, dy = _inputs(op, (2, 3, 100), kernel_device, seed=3)
    x = 0.3 * x  # small variance so eps=0.5 dominates it
    got = _run(getattr(triton_norms, op), x, w, b, dy, eps=0.5)
    ref = _run(getattr(reference, op), x, w, b, dy, eps=0.5)
    ref_small = _run(getattr(reference, op), x, w, b, dy, eps=EPS)
    for g, r in zip(got, ref, strict=True):
        _assert_rel(g, r, 1e-5)
    assert _max_err(ref[0], ref_small[0]) > 0.5


@pytest.mark.parametrize("op", OPS)
def test_backward_is_deterministic(op, kernel_device):
    x, w, b, dy = _inputs(op, (4, 33, 64), kernel_device, seed=4)
    first = _run(getattr(triton_norms, op), x, w, b, dy)
    second = _run(getattr(triton_norms, op), x, w, b, dy)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)
