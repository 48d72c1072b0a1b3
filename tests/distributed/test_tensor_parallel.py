"""Tensor parallelism on 2 gloo ranks against single-process references.

Every rank builds the full reference from seeded generators (no communication),
so each sharded result is checked against a hand or plain-torch computation.
"""

import pytest
import torch
import torch.nn.functional as F
from launcher import spawn
from torch import nn

from megatron_paci.parallel import comm
from megatron_paci.parallel.state import initialize
from megatron_paci.tensor_parallel import (
    ColumnParallelLinear,
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
    shard_of,
    vocab_parallel_cross_entropy,
)

TP = 2
EXACT = dict(atol=1e-6, rtol=1e-6)


def _randn(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gather(t, group, dim):
    return comm.all_gather(t.contiguous(), group, "tp", dim=dim % t.dim())


def _close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, **(tol or EXACT), msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- mappings

def _mappings_worker(rank, world):
    state = initialize(tensor=TP, pipeline=1)
    group, r = state.tensor_group, state.tensor_rank
    xs = [_randn(10 + k, 4, 2, 6) for k in range(TP)]   # rank k's input
    gs = [_randn(20 + k, 4, 2, 6) for k in range(TP)]   # rank k's upstream grad
    x_sum, g_sum = sum(xs), sum(gs)

    def run(fn, x, g, **kw):
        x = x.clone().requires_grad_()
        y = fn(x, group, **kw)
        y.backward(g)
        return y.detach(), x.grad

    def last(t, k):
        return t[..., 3 * k:3 * k + 3]

    def first(t, k, n=2):
        return t[n * k:n * k + n]

    comm.STATS.reset()
    y, dx = run(copy_to_tensor_parallel_region, xs[r], gs[r])
    _close(y, xs[r], "copy fwd")
    _close(dx, g_sum, "copy bwd")
    # ring all-reduce of 48 fp32 over 2 ranks: 2 * 1/2 * 192 bytes, all counted as tp
    assert comm.STATS.snapshot() == {"tp": 192}

    y, dx = run(reduce_from_tensor_parallel_region, xs[r], gs[r])
    _close(y, x_sum, "reduce fwd")
    _close(dx, gs[r], "reduce bwd")

    gl = [last(g, k) for k, g in enumerate(gs)]
    y, dx = run(scatter_to_tensor_parallel_region, xs[r], gl[r])
    _close(y, last(xs[r], r), "scatter tp fwd")
    _close(dx, torch.cat(gl, dim=-1), "scatter tp bwd")

    xl = [last(x, k) for k, x in enumerate(xs)]
    y, dx = run(gather_from_tensor_parallel_region, xl[r], gs[r])
    _close(y, torch.cat(xl, dim=-1), "gather tp fwd")
    _close(dx, last(gs[r], r), "gather tp bwd")

    gf = [first(g, k) for k, g in enumerate(gs)]
    y, dx = run(scatter_to_sequence_parallel_region, xs[r], gf[r])
    _close(y, first(xs[r], r), "scatter sp fwd")
    _close(dx, torch.cat(gf, dim=0), "scatter sp bwd")

    xf = [first(x, k) for k, x in enumerate(xs)]
    y, dx = run(gather_from_sequence_parallel_region, xf[r], gs[r])
    _close(y, torch.cat(xf, dim=0), "gather sp fwd")
    _close(dx, first(g_sum, r), "gather sp bwd (reduce-scatter)")
    y, dx = run(gather_from_sequence_parallel_region, xf[r], gs[r],
                tensor_parallel_output_grad=False)
    _close(dx, first(gs[r], r), "gather sp bwd (split)")

    y, dx = run(reduce_scatter_to_sequence_parallel_region, xs[r], gf[r])
    _close(y, first(x_sum, r), "reduce-scatter sp fwd")
    _close(dx, torch.cat(gf, dim=0), "reduce-scatter sp bwd")

    # Sizes that do not divide fail on every rank before any collective.
    odd = torch.randn(3, 2, 5)
    with pytest.raises(ValueError, match="size 5 along dim 2 is not divisible by the "
                                         "tensor-parallel group size 2"):
        scatter_to_tensor_parallel_region(odd, group)
    with pytest.raises(ValueError, match="size 3 along dim 0 is not divisible"):
        reduce_scatter_to_sequence_parallel_region(odd, group)
    with pytest.raises(ValueError, match=r"ColumnParallelLinear\(4, 5\): out_features=5 .* 2"):
        ColumnParallelLinear(4, 5, group=group)
    with pytest.raises(ValueError, match=r"RowParallelLinear\(5, 4\): in_features=5 .* 2"):
        RowParallelLinear(5, 4, group=group)
    with pytest.raises(ValueError, match=r"VocabParallelEmbedding\(15, 4\): num_embeddings=15"):
        VocabParallelEmbedding(15, 4, group=group)
    return sorted(comm.STATS.snapshot())


def test_mappings_forward_backward():
    assert spawn(_mappings_worker, TP) == [["tp"]] * TP


# ----------------------------------------------------------------- layers vs torch

def _mlp_check(group, r, sp):
    s, b, h, f = 4, 3, 6, 8
    x = _randn(1, s, b, h)
    w1, b1, w2, b2 = _randn(2, f, h), _randn(3, f), _randn(4, h, f), _randn(5, h)
    g = _randn(6, s, b, h)

    ref1, ref2 = nn.Linear(h, f), nn.Linear(f, h)
    with torch.no_grad():
        ref1.weight.copy_(w1), ref1.bias.copy_(b1), ref2.weight.copy_(w2), ref2.bias.copy_(b2)
    xr = x.clone().requires_grad_()
    y_ref = ref2(F.gelu(ref1(xr)))
    y_ref.backward(g)

    col = ColumnParallelLinear(h, f, group=group, sequence_parallel=sp)
    row = RowParallelLinear(f, h, group=group, sequence_parallel=sp)
    with torch.no_grad():
        for layer, ref in ((col, ref1), (row, ref2)):
            for name, p in layer.named_parameters():
                p.copy_(shard_of(getattr(ref, name), p.tensor_parallel_dim, r, TP))
    assert row.bias.sequence_parallel is sp and row.bias.tensor_parallel_dim is None
    x_in = shard_of(x, 0, r, TP) if sp else x
    x_in = x_in.clone().requires_grad_()
    y = row(F.gelu(col(x_in)))
    y.backward(shard_of(g, 0, r, TP) if sp else g)

    tag = f"mlp sp={sp}"
    _close(y.detach(), shard_of(y_ref.detach(), 0, r, TP) if sp else y_ref.detach(),
           f"{tag} output")
    _close(x_in.grad, shard_of(xr.grad, 0, r, TP) if sp else xr.grad, f"{tag} input grad")
    _close(_gather(col.weight.grad, group, 0), ref1.weight.grad, f"{tag} fc1 weight grad")
    _close(_gather(col.bias.grad, group, 0), ref1.bias.grad, f"{tag} fc1 bias grad")
    _close(_gather(row.weight.grad, group, 1), ref2.weight.grad, f"{tag} fc2 weight grad")
    bias_grad = row.bias.grad.clone()
    if sp:  # each rank saw half the sequence: partial grads that sum to the reference
        comm.all_reduce(bias_grad, group, "tp")
    _close(bias_grad, ref2.bias.grad, f"{tag} fc2 bias grad")


def _embedding_check(group, r, sp):
    v, d, s, b = 16, 5, 4, 3
    w = _randn(7, v, d)
    ids = torch.tensor([[0, 7, 8], [15, 3, 9], [8, 8, 1], [12, 6, 0]])  # both halves
    g = _randn(8, s, b, d)
    ref = nn.Embedding(v, d)
    with torch.no_grad():
        ref.weight.copy_(w)
    y_ref = ref(ids)
    y_ref.backward(g)

    emb = VocabParallelEmbedding(v, d, group=group, sequence_parallel=sp)
    with torch.no_grad():
        emb.weight.copy_(shard_of(w, emb.weight.tensor_parallel_dim, r, TP))
    y = emb(ids)
    y.backward(shard_of(g, 0, r, TP) if sp else g)
    tag = f"embedding sp={sp}"
    _close(y.detach(), shard_of(y_ref.detach(), 0, r, TP) if sp else y_ref.detach(),
           f"{tag} output")
    _close(_gather(emb.weight.grad, group, 0), ref.weight.grad, f"{tag} weight grad")

    # Tied head on the embedding's shard: logits shard = the reference's vocab slice.
    hid = _randn(9, s, b, d)
    hid_in = (shard_of(hid, 0, r, TP) if sp else hid).clone().requires_grad_()
    logits = parallel_lm_logits(hid_in, emb.weight.detach(), group, sequence_parallel=sp)
    _close(logits.detach(), shard_of(hid @ w.t(), 2, r, TP), f"{tag} lm logits")
    gl = _randn(10, s, b, v)
    logits.backward(shard_of(gl, 2, r, TP))
    _close(hid_in.grad, shard_of(gl @ w, 0, r, TP) if sp else gl @ w, f"{tag} lm hidden grad")


def _layers_worker(rank, world):
    state = initialize(tensor=TP, pipeline=1)
    for sp in (False, True):
        _mlp_check(state.tensor_group, state.tensor_rank, sp)
        _embedding_check(state.tensor_group, state.tensor_rank, sp)
    return True


def test_layers_match_torch_with_and_without_sequence_parallel():
    assert spawn(_layers_worker, TP) == [True] * TP


# ------------------------------------------------------------ cross-entropy and RNG

def _ce_rng_worker(rank, world):
    state = initialize(tensor=TP, pipeline=1)
    group, r = state.tensor_group, state.tensor_rank
    s, b, v = 3, 4, 10
    # Targets on rank 0's half (< 5) and rank 1's half, including both edges.
    target = torch.tensor([[0, 4, 5, 9], [2, 7, 3, 6], [9, 0, 5, 4]])
    g = _randn(11, s, b)
    # bf16: both sides compute in fp32 from the same bf16 logits, so the loss agrees
    # to fp32 rounding; the gradient is returned in bf16 (one ulp ~ 4e-3 near 1).
    tols = {torch.float32: (EXACT, EXACT), torch.bfloat16: (EXACT, dict(atol=8e-3, rtol=1e-2))}
    for dtype, (loss_tol, grad_tol) in tols.items():
        full = (4 * _randn(12, s, b, v)).to(dtype)
        ref_in = full.clone().requires_grad_()
        ref = F.cross_entropy(ref_in.float().reshape(-1, v), target.reshape(-1),
                              reduction="none").view(s, b)
        ref.backward(g)
        shard = shard_of(full, 2, r, TP).clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, target, group)
        assert loss.dtype == torch.float32
        _close(loss.detach(), ref.detach(), f"ce {dtype} loss", **loss_tol)
        loss.backward(g)
        assert shard.grad.dtype == dtype
        _close(_gather(shard.grad, group, -1), ref_in.grad, f"ce {dtype} grad", **grad_tol)
        # Transposed (non-contiguous) targets, as the model passes labels.t().
        loss_t = vocab_parallel_cross_entropy(shard.detach().transpose(0, 1), target.t(), group)
        _close(loss_t, ref.detach().t(), f"ce {dtype} transposed", **loss_tol)

    tracker = model_parallel_seed(1234, tp_rank=r)
    draws = {}
    before = torch.get_rng_state()
    with tracker.fork():
        draws["inside"] = torch.rand(8)
    draws["restored"] = torch.equal(torch.get_rng_state(), before)
    draws["outside"] = torch.rand(8)
    with tracker.fork():
        draws["inside2"] = torch.rand(8)
    # Dropout inside the tp region: different masks per tp rank, replayable from the seed.
    draws["mask"] = F.dropout(torch.ones(16), 0.5, training=True)
    with tracker.fork():
        draws["tp_mask"] = F.dropout(torch.ones(16), 0.5, training=True)
    # Plain lists: tensors would travel through shared memory of an exiting process.
    return {k: v.tolist() if torch.is_tensor(v) else v for k, v in draws.items()}


def test_vocab_parallel_cross_entropy_and_rng_tracker():
    d0, d1 = ({k: torch.tensor(v) for k, v in d.items()} for d in spawn(_ce_rng_worker, TP))
    assert d0["restored"] and d1["restored"]
    assert not torch.equal(d0["inside"], d1["inside"])
    assert torch.equal(d0["outside"], d1["outside"])
    assert torch.equal(d0["mask"], d1["mask"])
    assert not torch.equal(d0["tp_mask"], d1["tp_mask"])
    # The named stream continues where it left off (not reseeded per fork).
    assert not torch.equal(d0["inside"], d0["inside2"])
    for k, d in enumerate((d0, d1)):
        ref = torch.rand(8, generator=torch.Generator().manual_seed(1234 + 2718 + k))
        assert torch.equal(d["inside"], ref)
    assert torch.equal(d0["outside"],
                       torch.rand(8, generator=torch.Generator().manual_seed(1234)))
