"""Fused Triton cross-entropy on 2 gloo ranks, each holding half the vocabulary.

Both ranks build the same full logits from a seed and keep their half; the
loss must equal the single-process reference on the full logits on both ranks,
and the two grad halves side by side must equal the reference grad. One spawn
serves every test in this module.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from launcher import spawn

from megatron_paci.kernels import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed")

WORLD = 2
SHAPE = (2, 4, 200)  # 8 rows, 100 columns a rank
BLOCK = 32  # 4 chunks a row, the last one partial


def _full_inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(SHAPE, generator=g) * 3).to(dtype)
    half = SHAPE[-1] // 2
    target = torch.randint(0, half, SHAPE[:-1], generator=g)
    target[..., 1::2] += half  # targets on both ranks' halves
    grad_loss = torch.randn(SHAPE[:-1], generator=g)
    return logits, target, grad_loss


def _worker(rank: int, world: int) -> dict:
    # The child runs no conftest, and its tensors are CPU (gloo): the interpreter
    # must be on before triton is first imported, even on a machine with CUDA.
    os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    from megatron_paci.kernels.triton_cross_entropy import cross_entropy
    from megatron_paci.parallel import comm

    group = dist.new_group(list(range(world)))
    out: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        logits, target, grad_loss = _full_inputs(dtype)
        per_rank = SHAPE[-1] // world
        shard = logits[..., rank * per_rank:(rank + 1) * per_rank].contiguous()
        for inplace in (False, True):
            x = shard.clone().requires_grad_()
            comm.STATS.reset()
            # The explicit vocab_start only on the in-place run: the default must agree.
            kw = {"vocab_start": rank * per_rank} if inplace else {}
            loss = cross_entropy(x, target, group, block_v=BLOCK, inplace_backward=inplace,
                                 **kw)
            tp_bytes = comm.STATS.snapshot().get("tp", 0)
            (grad,) = torch.autograd.grad(loss, x, grad_loss)
            key = f"{name}_{'inplace' if inplace else 'copy'}"
            out[key] = {"loss": loss.detach(), "grad": grad.float(), "tp_bytes": tp_bytes,
                        "aliased": grad.data_ptr() == x.data_ptr()}
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(_worker, world_size=WORLD, timeout=60)


def _reference(dtype: torch.dtype):
    logits, target, grad_loss = _full_inputs(dtype)
    x = logits.float().requires_grad_()
    loss = reference.cross_entropy(x, target)
    (grad,) = torch.autograd.grad(loss, x, grad_loss)
    return loss.detach(), grad


# bf16: fp32 math on the same bf16 values for the loss; the grad is cast to bf16
# once (the interpreter truncates: one ulp, 2**-8 relative).
TOL = {"fp32": ((1e-5, 1e-5), (1e-5, 1e-6)), "bf16": ((1e-5, 1e-5), (2 ** -7, 1e-6))}


@pytest.mark.parametrize("mode", ["copy", "inplace"])
@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_loss_and_grad_match_full_vocab_reference(results, name, mode):
    ref_loss, ref_grad = _reference(torch.float32 if name == "fp32" else torch.bfloat16)
    (loss_tol, grad_tol) = TOL[name]
    key = f"{name}_{mode}"
    for rank in range(WORLD):
        torch.testing.assert_close(torch.from_numpy(results[rank][key]["loss"]), ref_loss,
                                   rtol=loss_tol[0], atol=loss_tol[1])
        assert results[rank][key]["aliased"] == (mode == "inplace")
    grad = torch.cat([torch.from_numpy(results[r][key]["grad"]) for r in range(WORLD)], dim=-1)
    torch.testing.assert_close(grad, ref_grad, rtol=grad_tol[0], atol=grad_tol[1])


def test_only_per_token_scalars_cross_the_wire(results):
    """All-gather of one fp32 max a token (output 2 x 8 floats, half sent) plus
    an all-reduce of two fp32 a token (2 (n-1)/n x 2 x 8 floats): 12 bytes a
    token at tp=2, nothing vocabulary-sized."""
    tokens = SHAPE[0] * SHAPE[1]
    expected = (WORLD - 1) / WORLD * WORLD * tokens * 4 + 2 * (WORLD - 1) / WORLD * 2 * tokens * 4
    for rank in range(WORLD):
        for key, res in results[rank].items():
            assert res["tp_bytes"] == int(expected), key
