"""Tensor-parallel layers with ``group=None`` are exactly the plain torch ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_paci.tensor_parallel import (
    ColumnParallelLinear,
    RNGTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    model_parallel_seed,
    parallel_lm_logits,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
    set_tp_attributes,
    shard_of,
    vocab_parallel_cross_entropy,
)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def test_mappings_are_identity_without_group():
    x = torch.randn(4, 2, 6)
    for fn in (copy_to_tensor_parallel_region, reduce_from_tensor_parallel_region,
               scatter_to_tensor_parallel_region, gather_from_tensor_parallel_region,
               scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
               reduce_scatter_to_sequence_parallel_region):
        assert fn(x, None) is x


@pytest.mark.parametrize("sp", [False, True])
def test_linears_equal_nn_linear(sp):
    torch.manual_seed(0)
    ref = nn.Linear(6, 10)
    col = ColumnParallelLinear(6, 10, sequence_parallel=sp, gather_output=True)
    row = RowParallelLinear(6, 10, sequence_parallel=sp, input_is_parallel=False)
    x = torch.randn(4, 3, 6, requires_grad=True)
    g = torch.randn(4, 3, 10)
    (ref(x) * g).sum().backward()
    x_ref_grad, ref_grads = x.grad.clone(), _grads(ref)
    for layer in (col, row):
        layer.load_state_dict(ref.state_dict())
        x.grad = None
        y = layer(x)
        assert torch.equal(y, ref(x))
        (y * g).sum().backward()
        assert torch.equal(x.grad, x_ref_grad)
        assert all(torch.equal(a, b) for a, b in zip(_grads(layer).values(),
                                                     ref_grads.values(), strict=True))
    # Names match nn.Linear so checkpoints keep one naming.
    assert list(col.state_dict()) == list(ref.state_dict()) == list(row.state_dict())
    assert ColumnParallelLinear(6, 10, bias=False).bias is None


def test_column_weight_override_and_lm_logits():
    torch.manual_seed(1)
    w = torch.randn(10, 6)
    x = torch.randn(4, 3, 6)
    col = ColumnParallelLinear(6, 10, bias=False)
    assert torch.equal(col(x, weight=w), F.linear(x, w))
    assert torch.equal(parallel_lm_logits(x, w, None, sequence_parallel=True), F.linear(x, w))
    with pytest.raises(ValueError, match=r"weight shape \(6, 10\), expected \(10, 6\)"):
        col(x, weight=w.t())


def test_embedding_equals_nn_embedding():
    torch.manual_seed(2)
    ref = nn.Embedding(16, 8)
    emb = VocabParallelEmbedding(16, 8, sequence_parallel=True)
    emb.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 16, (5, 3))
    g = torch.randn(5, 3, 8)
    y = emb(ids)
    assert torch.equal(y, ref(ids))
    (y * g).sum().backward()
    (ref(ids) * g).sum().backward()
    assert torch.equal(emb.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_torch(dtype):
    torch.manual_seed(3)
    logits = (3 * torch.randn(5, 3, 11)).to(dtype).requires_grad_()
    target = torch.randint(0, 11, (5, 3))
    loss = vocab_parallel_cross_entropy(logits, target, None)
    assert loss.dtype == torch.float32 and loss.shape == (5, 3)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.float().reshape(-1, 11), target.reshape(-1),
                          reduction="none").view(5, 3)
    assert torch.equal(loss, ref)
    g = torch.randn(5, 3)
    (loss * g).sum().backward()
    (ref * g).sum().backward()
    assert logits.grad.dtype == dtype
    assert torch.equal(logits.grad, ref_logits.grad)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(logits, target.t(), None)


def test_tp_attributes_on_every_parameter():
    col, row = ColumnParallelLinear(4, 8), RowParallelLinear(8, 4)
    emb = VocabParallelEmbedding(8, 4)
    assert (col.weight.tensor_parallel_dim, col.bias.tensor_parallel_dim) == (0, 0)
    assert (row.weight.tensor_parallel_dim, row.bias.tensor_parallel_dim) == (1, None)
    assert emb.weight.tensor_parallel_dim == 0
    for m in (col, row, emb):
        for p in m.parameters():
            assert p.sequence_parallel is False
    p = set_tp_attributes(nn.Parameter(torch.zeros(3)), None, sequence_parallel=True)
    assert p.tensor_parallel_dim is None and p.sequence_parallel is True


def test_shard_of():
    full = torch.arange(24.0).view(4, 6)
    assert shard_of(full, None, 1, 2) is full
    assert torch.equal(shard_of(full, 0, 1, 2), full[2:])
    assert torch.equal(shard_of(full, 1, 2, 3), full[:, 4:])
    assert shard_of(full, 1, 0, 2).is_contiguous()
    parts = [shard_of(full, 1, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts, dim=1), full)
    with pytest.raises(ValueError, match=r"6 is not divisible by tensor-parallel size 4"):
        shard_of(full, 1, 0, 4)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        shard_of(full, 0, 2, 2)


def test_rng_tracker_single_process():
    tracker = model_parallel_seed(1234, tp_rank=0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    # The default stream is seed + 100 * pp_rank, the tp stream seed + 2718 + tp_rank.
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(1234)))
    assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(1234 + 2718)))
    # The named stream advances across forks; get/set_states round-trips it.
    saved = tracker.get_states()
    assert set(saved) == {"tensor-parallel-rng/cpu"}
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), b)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("nope"):
            pass
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("tensor-parallel-rng", 1)
    fresh = RNGTracker()
    fresh.set_states(saved)
    with fresh.fork():
        assert torch.equal(torch.rand(4), b)


def test_model_parallel_seed_offsets():
    # Megatron: every stream of pipeline stage p starts from seed + 100 * p.
    tracker = model_parallel_seed(7, tp_rank=1, pp_rank=2)
    with tracker.fork():
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(207)))
    assert torch.equal(inside,
                       torch.rand(3, generator=torch.Generator().manual_seed(207 + 2718 + 1)))
