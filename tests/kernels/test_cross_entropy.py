"""Fused Triton cross-entropy against the plain-torch reference, single process.

By default the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET), so shapes stay at a few dozen rows; ``block_v=64`` is below
every vocabulary size here, so the chunk loop runs several times and ends on a
partial (masked) chunk. With MEGATRON_PACI_TEST_DEVICE=cuda the same inputs (drawn
on the CPU, then moved) run through the compiled kernels on the GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from megatron_paci.kernels import reference  # noqa: E402
from megatron_paci.kernels.triton_cross_entropy import cross_entropy  # noqa: E402

BLOCK = 64
SHAPES = [(3, 5, 200), (7, 1000)]
# fp32: same math, different summation order. bf16: the loss is fp32 math on the
# same bf16 values (so as tight as fp32); the grad is cast to bf16 once: half an
# ulp (2**-9 relative) on GPU, but Triton's interpreter truncates, a full ulp
# (2**-8 relative), hence rtol 2**-7.
TOL = {
    torch.float32: {"loss": (1e-5, 1e-5), "grad": (1e-5, 1e-6)},
    torch.bfloat16: {"loss": (1e-5, 1e-5), "grad": (2 ** -7, 1e-6)},
}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0,
            scale: float = 3.0, offset: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale + offset).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    flat = target.view(-1)
    flat[0], flat[-1] = 0, shape[-1] - 1  # first and last column: chunk edges
    grad_loss = torch.randn(shape[:-1], generator=g)
    return logits.to(device), target.to(device), grad_loss.to(device)


def _reference(logits: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor):
    """fp32 loss and fp32 grad on the same (possibly bf16-valued) inputs."""
    x = logits.detach().float().requires_grad_()
    loss = reference.cross_entropy(x, target)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    return loss.detach(), grad


def _fused(logits: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = cross_entropy(x, target, **kw)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    return loss.detach(), grad, x


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["3x5x200", "7x1000"])
def test_matches_reference(shape, dtype, kernel_device):
    logits, target, grad_loss = _inputs(shape, dtype, kernel_device)
    ref_loss, ref_grad = _reference(logits, target, grad_loss)
    loss, grad, _ = _fused(logits, target, grad_loss, block_v=BLOCK)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    rtol, atol = TOL[dtype]["loss"]
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    rtol, atol = TOL[dtype]["grad"]
    torch.testing.assert_close(grad.float(), ref_grad, rtol=rtol, atol=atol)


def test_default_block_and_large_logits(kernel_device):
    """One chunk covering the row (default block), and logits far from 0: the
    kernel subtracts the max before exp, so an offset of 500 costs nothing."""
    logits, target, grad_loss = _inputs((4, 200), torch.float32, kernel_device, seed=1,
                                        offset=500.0)
    ref_loss, ref_grad = _reference(logits, target, grad_loss)
    loss, grad, _ = _fused(logits, target, grad_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_same_grad(dtype, kernel_device):
    logits, target, grad_loss = _inputs((7, 1000), dtype, kernel_device, seed=2)
    loss, grad, _ = _fused(logits, target, grad_loss, block_v=BLOCK)
    loss_ip, grad_ip, _ = _fused(logits, target, grad_loss, block_v=BLOCK,
                                 inplace_backward=True)
    assert torch.equal(loss_ip, loss)
    assert torch.equal(grad_ip, grad)  # same kernel, same arithmetic: bitwise equal


def test_inplace_backward_peak_memory(kernel_device):
    """The memory argument, per logit element with bf16 logits: the torch path
    peaks at 2 (logits) + 12 bytes of fp32 copies and gradients (counted by
    scripts/bench_ce_memory.py). Here the saved state is the logits themselves
    (same storage) plus 16 bytes a row, and the grad is written over the logits:
    2 bytes, one logits-sized buffer in all."""
    shape = (3, 5, 200)
    rows = 15
    logits, target, grad_loss = _inputs(shape, torch.bfloat16, kernel_device, seed=3)
    x = logits.clone().requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cross_entropy(x, target, block_v=BLOCK, inplace_backward=True)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    small_bytes = sum(t.numel() * t.element_size() for t in saved if t is not big[0])
    assert small_bytes == rows * (8 + 4 + 4)  # int64 target, fp32 max, fp32 log-sum-exp

    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    assert grad.data_ptr() == x.data_ptr()  # the grad lives in the logits' storage
    _, ref_grad = _reference(logits, target, grad_loss)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2 ** -7, atol=1e-6)
    with pytest.raises(RuntimeError, match="twice"):
        # Autograd frees the graph after one backward; the guard covers retain_graph.
        y = logits.clone().requires_grad_()
        out = cross_entropy(y, target, block_v=BLOCK, inplace_backward=True).sum()
        out.backward(retain_graph=True)
        out.backward()

    # Without the flag the input is left untouched and the grad is a new buffer.
    y = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(cross_entropy(y, target, block_v=BLOCK), y, grad_loss)
    assert grad.data_ptr() != y.data_ptr() and torch.equal(y.detach(), logits)


def test_targets_outside_shard(kernel_device):
    """A shard [100, 300) of a 400-column vocabulary, alone (tp=1 but a
    vocab_start): off-shard targets add no target logit and no one-hot."""
    full, _, grad_loss = _inputs((6, 400), torch.float32, kernel_device, seed=4)
    shard = full[:, 100:300].contiguous()
    target = torch.tensor([0, 99, 100, 299, 300, 399], device=kernel_device)
    owned = (target >= 100) & (target < 300)
    loss, grad, _ = _fused(shard, target, grad_loss, vocab_start=100, block_v=BLOCK)

    lse = torch.logsumexp(shard, dim=-1)
    t_logit = torch.where(owned, shard.gather(-1, (target - 100).clamp(0, 199)[:, None])[:, 0],
                          torch.zeros_like(lse))
    torch.testing.assert_close(loss, lse - t_logit, rtol=1e-5, atol=1e-5)
    onehot = torch.zeros_like(shard)
    onehot[owned, (target - 100)[owned]] = 1.0
    expect = (torch.softmax(shard, dim=-1) - onehot) * grad_loss[:, None]
    torch.testing.assert_close(grad, expect, rtol=1e-5, atol=1e-6)


def test_rejects_bad_arguments(kernel_device):
    logits, target, _ = _inputs((4, 200), torch.float32, kernel_device)
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="power of two"):
        cross_entropy(logits, target, block_v=48)
