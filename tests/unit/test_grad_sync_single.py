"""GradBuffer and the ZeRO-1 optimizer in one process (dp_group=None): no comm, no scaling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_paci.optim.distributed_optimizer import DistributedOptimizer
from megatron_paci.optim.grad_sync import GradBuffer
from megatron_paci.optim.optimizer import optimizer_state_by_name
from megatron_paci.parallel import comm


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 2)).to(dtype)


def _micro_batches(n: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(3, 4, generator=g).to(dtype), torch.randn(3, 2, generator=g).to(dtype))
            for _ in range(n)]


@pytest.mark.parametrize("bucket_size_bytes", [1, 200, 40_000_000 * 4])
def test_main_grad_accumulates_like_plain_grad(bucket_size_bytes):
    model, ref = _model(), _model()
    buf = GradBuffer(list(model.named_parameters()), None, bucket_size_bytes=bucket_size_bytes)
    comm.STATS.reset()
    mbs = _micro_batches(3)
    for i, (x, y) in enumerate(mbs):
        if i < len(mbs) - 1:
            with buf.no_sync():
                F.mse_loss(model(x), y).backward()
        else:
            F.mse_loss(model(x), y).backward()
        F.mse_loss(ref(x), y).backward()
    assert buf.launch_log == []  # one process: no hook counts arrivals, nothing to launch
    buf.finish_grad_sync()
    assert [b for b, _ in buf.launch_log] == [b.index for b in buf.buckets]
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert p.grad is p.main_grad  # autograd accumulated into the buffer view
        assert p.main_grad.data_ptr() >= buf.buffer.data_ptr()
        torch.testing.assert_close(p.main_grad, q.grad, rtol=0, atol=0)
    assert comm.STATS.snapshot() == {}  # size-1 group: nothing on the wire

    buf.zero_grad()
    assert all((p.main_grad == 0).all() for p in model.parameters())
    assert buf.launch_log == []


def test_bf16_params_accumulate_in_fp32():
    model = _model(torch.bfloat16)
    buf = GradBuffer(list(model.named_parameters()), None)
    probe = copy.deepcopy(model)
    expected = [torch.zeros(p.shape, dtype=torch.float32) for p in probe.parameters()]
    mbs = _micro_batches(4, torch.bfloat16)
    for x, y in mbs:
        with buf.no_sync():
            F.mse_loss(model(x), y).backward()
        F.mse_loss(probe(x), y).backward()
        for e, p in zip(expected, probe.parameters(), strict=True):
            e += p.grad.float()  # each micro-batch's bf16 grad, summed in fp32
            p.grad = None
    buf.finish_grad_sync()
    for p, e in zip(model.parameters(), expected, strict=True):
        assert p.dtype == torch.bfloat16 and p.main_grad.dtype == torch.float32
        torch.testing.assert_close(p.main_grad, e, rtol=0, atol=0)
    assert buf.buffer.dtype == torch.float32


def test_frozen_tied_and_layout():
    model = _model()
    model[2].requires_grad_(False)
    named = list(model.named_parameters()) + [("alias.weight", model[0].weight)]
    buf = GradBuffer(named, None, bucket_size_bytes=1)
    assert len(buf.params) == 4 and not hasattr(model[2].weight, "main_grad")
    # Reverse registration order: the last layer's bias sits at the buffer start.
    assert buf.buckets[0].names == ["4.bias"] and buf.buckets[-1].names == ["0.weight"]
    assert buf.names[id(model[0].weight)] == "0.weight"
    assert model[4].bias.main_grad.data_ptr() == buf.buffer.data_ptr()


def test_rebound_grad_is_refused_before_the_step():
    model = _model()
    buf = GradBuffer(list(model.named_parameters()), None)
    x, y = _micro_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)  # what a stray torch idiom would do
    F.mse_loss(model(x), y).backward()  # now lands in a fresh .grad, not the buffer
    with pytest.raises(RuntimeError, match=r"0\.weight\.grad no longer aliases its main_grad"):
        buf.finish_grad_sync()


def test_second_backward_into_launched_bucket_raises():
    # bf16 parameters keep a hook per parameter (fp32 ones have none in one process)
    model = _model(torch.bfloat16)
    buf = GradBuffer(list(model.named_parameters()), None)
    x, y = _micro_batches(1, torch.bfloat16)[0]
    F.mse_loss(model(x), y).backward()
    assert buf.launch_log == [(0, 6)]  # one bucket, launched by the sixth hook
    with pytest.raises(RuntimeError, match="after its bucket"):
        F.mse_loss(model(x), y).backward()


def test_distributed_optimizer_single_process_matches_adamw():
    model, ref = _model(), _model()
    named = list(model.named_parameters())
    buf = GradBuffer(named, None, bucket_size_bytes=100, reduce_scatter=True)
    opt = DistributedOptimizer(named, buf, None, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                               weight_decay=0.1)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for lr, (x, y) in zip((1e-2, 3e-3), _micro_batches(2), strict=True):
        buf.zero_grad()
        F.mse_loss(model(x), y).backward()
        buf.finish_grad_sync()
        opt.step(lr)
        ref_opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        for g in ref_opt.param_groups:
            g["lr"] = lr
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    mine = opt.state_by_name()
    theirs = optimizer_state_by_name(list(ref.named_parameters()), ref_opt)
    assert mine.keys() == theirs.keys()
    for k, v in theirs.items():
        torch.testing.assert_close(mine[k], v, rtol=1e-6, atol=1e-9)
