"""Data-parallel gradient sync and the ZeRO-1 optimizer on 2 gloo ranks.

The reference is one process running the whole global batch. Each rank builds
it itself (same seed), so a worker only returns numbers; one spawn serves every
test in this module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from launcher import spawn
from torch import nn

from megatron_paci.optim.distributed_optimizer import DistributedOptimizer
from megatron_paci.optim.grad_sync import GradBuffer
from megatron_paci.parallel import comm

GLOBAL_BATCH = 8
MICRO = 2  # micro-batches per rank per step
LRS = (1e-2, 5e-3, 2e-3)
BETAS = (0.9, 0.95)
WD = 0.1


class Net(nn.Module):
    """Biased linears, a frozen layer, a weight used twice under two names, an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.unused = nn.Linear(2, 2)
        self.l1 = nn.Linear(5, 7)
        self.frozen = nn.Linear(7, 7).requires_grad_(False)
        self.l2 = nn.Linear(7, 6)
        self.sq = nn.Linear(6, 6)
        self.sq_alias = self.sq
        self.l3 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.frozen(torch.tanh(self.l1(x))))
        x = torch.tanh(self.sq(torch.tanh(self.sq(torch.tanh(self.l2(x))))))
        return self.l3(x)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def _local_backward(model: Net, buf: GradBuffer, step: int, rank: int, world: int) -> None:
    """This rank's half of the global batch over MICRO micro-batches, no_sync on all but last."""
    x, y = _batch(step)
    per_rank = GLOBAL_BATCH // world
    xs = x[rank * per_rank:(rank + 1) * per_rank].chunk(MICRO)
    ys = y[rank * per_rank:(rank + 1) * per_rank].chunk(MICRO)
    for i, (xb, yb) in enumerate(zip(xs, ys, strict=True)):
        loss = F.mse_loss(model(xb), yb) / MICRO
        if i < MICRO - 1:
            with buf.no_sync():
                loss.backward()
        else:
            loss.backward()


def _reference_grads(step: int) -> dict[str, torch.Tensor]:
    ref = Net()
    x, y = _batch(step)
    F.mse_loss(ref(x), y).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _grad_checks(rank: int, world: int, group) -> dict:
    out: dict = {}
    ref = _reference_grads(0)
    for label, kw in (("one_bucket", {}), ("per_param", {"bucket_size_bytes": 1}),
                      ("no_overlap", {"bucket_size_bytes": 1, "overlap": False})):
        model = Net()
        named = list(model.named_parameters(remove_duplicate=False))
        buf = GradBuffer(named, group, **kw)
        comm.STATS.reset()
        _local_backward(model, buf, 0, rank, world)
        log = list(buf.launch_log)
        buf.finish_grad_sync()
        params = dict(model.named_parameters())
        out[label] = {
            "err": max(_rel_err(params[n].main_grad, g) for n, g in ref.items()),
            "unused_zero": bool((model.unused.weight.main_grad == 0).all()),
            # fp32: .grad is the main_grad view autograd accumulated into
            "grads_none": all(p.grad is p.main_grad for p in buf.params),
            "frozen_skipped": not hasattr(model.frozen.weight, "main_grad"),
            "n_params": len(buf.params),
            "n_buckets": len(buf.buckets),
            "buffer_numel": buf.numel,
            "bucket_numels": [b.numel for b in buf.buckets],
            "log_in_backward": log,
            "launched_after": [i for i, _ in buf.launch_log[len(log):]],
            "stats": comm.STATS.snapshot(),
            "calls": dict(comm.STATS.calls),
            "sum": buf.buffer.sum().item(),
        }
        buf.remove_hooks()
    return out


def _zero_checks(rank: int, world: int, group) -> dict:
    """3 ZeRO-1 steps against torch.optim.AdamW over the global batch in one process."""
    ref = Net()
    decay = [p for p in ref.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.requires_grad and p.ndim < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=LRS[0], betas=BETAS, eps=1e-8)
    model = Net()
    named = list(model.named_parameters())
    buf = GradBuffer(named, group, bucket_size_bytes=120, reduce_scatter=True)
    opt = DistributedOptimizer(named, buf, group, lr=LRS[0], betas=BETAS, eps=1e-8,
                               weight_decay=WD, no_decay=lambda n, p: p.ndim < 2)
    out: dict = {"param_err": [], "rs_bytes": [], "ag_bytes": [], "shard_grad_err": [],
                 "norm_sq": []}
    for step, lr in enumerate(LRS):
        ref_opt.zero_grad()
        x, y = _batch(step)
        F.mse_loss(ref(x), y).backward()
        for p in ref.parameters():  # an unused param still steps (decay), as in Megatron
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        for group_ in ref_opt.param_groups:
            group_["lr"] = lr
        ref_opt.step()

        buf.zero_grad()
        comm.STATS.reset()
        _local_backward(model, buf, step, rank, world)
        buf.finish_grad_sync()
        out["rs_bytes"].append(comm.STATS.snapshot().get("dp", 0))
        # This rank's reduced shard equals the same slice of the reference grads.
        ref_flat = torch.zeros(buf.numel)
        for p_ref, p in zip(ref.parameters(), model.parameters(), strict=True):
            if p.requires_grad:
                start, n = buf.param_range[id(p)]
                ref_flat[start:start + n] = p_ref.grad.reshape(-1)
        ref_shard = torch.cat([ref_flat[lo:hi] for lo, hi in opt.ranges])
        out["shard_grad_err"].append(_rel_err(opt.local_grad_shard(), ref_shard))
        out["norm_sq"].append((opt.grad_norm_sq_local(), float(ref_shard.double().pow(2).sum())))
        comm.STATS.reset()
        opt.step(lr)
        out["ag_bytes"].append(comm.STATS.snapshot().get("dp", 0))
        out["param_err"].append(max(
            _rel_err(p.detach(), p_ref.detach())
            for p, p_ref in zip(model.parameters(), ref.parameters(), strict=True)))
    out["bucket_numels"] = [b.numel for b in buf.buckets]
    out["fp32_aliased"] = all(
        p.data_ptr() == opt.param_buffer[buf.param_range[id(p)][0]:].data_ptr()
        for p in buf.params)

    # Full state equals the single-process AdamW state, under the same names.
    state = opt.state_by_name()
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    state_err, keys_ok = 0.0, True
    for p in ref.parameters():
        if not p.requires_grad:
            continue
        name = ref_names[id(p)]
        s = ref_opt.state[p]
        keys_ok &= int(state[f"{name}.step"].item()) == int(s["step"].item()) == len(LRS)
        keys_ok &= state[f"{name}.exp_avg"].shape == p.shape
        for key in ("exp_avg", "exp_avg_sq"):
            state_err = max(state_err, _rel_err(state[f"{name}.{key}"], s[key]))
    out["state_err"] = state_err
    out["state_keys_ok"] = bool(keys_ok)
    out["state_n"] = len(state)

    # Round trip: a fresh optimizer loading the full state continues identically.
    model2 = Net()
    with torch.no_grad():
        for p2, p in zip(model2.parameters(), model.parameters(), strict=True):
            p2.copy_(p)
    named2 = list(model2.named_parameters())
    buf2 = GradBuffer(named2, group, bucket_size_bytes=120, reduce_scatter=True)
    opt2 = DistributedOptimizer(named2, buf2, group, lr=LRS[0], betas=BETAS, eps=1e-8,
                                weight_decay=WD)
    opt2.load_state_by_name(state)
    out["roundtrip_shard_equal"] = bool(torch.equal(opt2.exp_avg, opt.exp_avg)
                                        and torch.equal(opt2.exp_avg_sq, opt.exp_avg_sq)
                                        and opt2.step_count == opt.step_count)
    for o, m, b in ((opt, model, buf), (opt2, model2, buf2)):
        b.zero_grad()
        _local_backward(m, b, 7, rank, world)
        b.finish_grad_sync()
        o.scale_grads(0.5)  # as a clipping caller would
        o.step(1e-3)
    out["roundtrip_next_step_equal"] = all(
        torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    out["final_param_sum"] = sum(p.detach().double().sum().item() for p in model.parameters())
    return out


def _worker(rank: int, world: int) -> dict:
    group = torch.distributed.new_group(list(range(world)))
    return {"grad": _grad_checks(rank, world, group), "zero": _zero_checks(rank, world, group)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return spawn(_worker, 2)


def test_main_grad_equals_single_process_mean_grad(results):
    for res in results:
        for label, r in res["grad"].items():
            assert r["err"] < 1e-6, (label, r["err"])
            assert r["unused_zero"] and r["grads_none"] and r["frozen_skipped"], label
            # l1, l2, sq (once, though named twice), l3, unused: weight + bias each
            assert r["n_params"] == 10, label
    assert results[0]["grad"]["one_bucket"]["n_buckets"] == 1
    assert results[0]["grad"]["per_param"]["n_buckets"] == 10
    # Both ranks hold the same averaged gradients.
    for label in results[0]["grad"]:
        assert results[0]["grad"][label]["sum"] == results[1]["grad"][label]["sum"]


def test_buckets_launch_during_backward(results):
    r = results[0]["grad"]["per_param"]
    used = 8  # hooks that fire on the last micro-batch (not the unused layer's)
    first_bucket, hooks_at_launch = r["log_in_backward"][0]
    assert hooks_at_launch < used  # launched while earlier layers' hooks were still pending
    assert [n for _, n in r["log_in_backward"]] == sorted(n for _, n in r["log_in_backward"])
    assert len(r["log_in_backward"]) == used
    # The unused layer (registered first, so last in the buffer) launches at finish.
    assert r["launched_after"] == [8, 9]
    # Without overlap nothing is launched inside backward.
    assert results[0]["grad"]["no_overlap"]["log_in_backward"] == []
    assert len(results[0]["grad"]["no_overlap"]["launched_after"]) == 10


def test_all_reduce_bytes_match_ring_formula(results):
    n = 2
    for res in results:
        for label, r in res["grad"].items():
            assert r["buffer_numel"] % n == 0
            assert r["buffer_numel"] == sum(r["bucket_numels"])
            expected = sum(int(2 * (n - 1) / n * k * 4) for k in r["bucket_numels"])
            assert r["stats"] == {"dp": expected}, label
            assert r["calls"] == {"dp": r["n_buckets"]}, label


def test_zero1_matches_torch_adamw(results):
    for res in results:
        z = res["zero"]
        assert len(z["bucket_numels"]) > 1 and all(k % 2 == 0 for k in z["bucket_numels"])
        assert max(z["shard_grad_err"]) < 1e-6, z["shard_grad_err"]
        for mine, ref in z["norm_sq"]:
            assert mine == pytest.approx(ref, rel=1e-6)
        assert max(z["param_err"]) < 1e-6, z["param_err"]
        assert z["fp32_aliased"]
        ring = sum(int((2 - 1) / 2 * k * 4) for k in z["bucket_numels"])
        assert z["rs_bytes"] == [ring] * len(LRS)
        assert z["ag_bytes"] == [ring] * len(LRS)
    # The two ranks own different shards, and the gathered weights agree.
    assert results[0]["zero"]["final_param_sum"] == results[1]["zero"]["final_param_sum"]


def test_zero1_state_by_name_and_roundtrip(results):
    for res in results:
        z = res["zero"]
        assert z["state_keys_ok"]
        assert z["state_n"] == 3 * 10
        assert z["state_err"] < 1e-6, z["state_err"]
        assert z["roundtrip_shard_equal"]
        assert z["roundtrip_next_step_equal"]
