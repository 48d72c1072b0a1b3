"""model.recompute=full|selective: the same losses and gradients as none, dropout
included; less memory held between a forward and its backward; and the weights a
recomputed backward runs on under the live-weight policy (PACI) and 2BW's stash."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from megatron_paci.config import load_config
from megatron_paci.model.gpt import GPTModel, StageSpec
from megatron_paci.model.transformer import LayerContext
from megatron_paci.pipeline.versions import LiveWeights, TwoVersionStash
from megatron_paci.tensor_parallel import model_parallel_seed
from megatron_paci.training import plan as P

S, B, H, A, V = 32, 2, 32, 4, 64


def model_cfg(recompute="none", dropout=0.0, layers=2):
    return load_config(None, [f"model.num_layers={layers}", f"model.hidden_size={H}",
                              f"model.num_attention_heads={A}", f"model.seq_length={S}",
                              f"model.dropout={dropout}", f"model.attention_dropout={dropout}",
                              f"model.recompute={recompute}"]).model


def build(recompute="none", dropout=0.0, layers=2, pre=True, post=True):
    # The tracker is what a trainer has: attention dropout draws from its fork.
    ctx = LayerContext(rng=model_parallel_seed(7, 0))
    return GPTModel(model_cfg(recompute, dropout, layers), V,
                    stage=StageSpec(0, layers, pre, post), tp=ctx).train()


def two_in_flight(recompute, dropout):
    """F(1), F(2), B(1), B(2), as a pipeline stage runs them: the RNG streams move on
    between a forward and its backward's recompute."""
    model = build(recompute, dropout)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, V, (B, S), generator=gen) for _ in range(2)]
    losses = [model(tokens=t, labels=t).mean() for t in tokens]
    for loss in losses:
        loss.backward()
    return [x.item() for x in losses], {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_gives_the_losses_and_gradients_of_none(recompute, dropout):
    want_losses, want = two_in_flight("none", dropout)
    got_losses, got = two_in_flight(recompute, dropout)
    assert got_losses == pytest.approx(want_losses, abs=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    if dropout:  # the masks are really on: a dropout-free run differs
        assert two_in_flight("none", 0.0)[0] != pytest.approx(want_losses, abs=1e-3)


def test_a_recompute_without_the_tracker_replay_would_differ(monkeypatch):
    """The check above can fail: with the tp stream not replayed, the recomputed
    attention dropout draws another mask."""
    import contextlib

    from megatron_paci.model import transformer

    _, want = two_in_flight("none", 0.2)
    monkeypatch.setattr(transformer, "_replay_tracker", lambda rng: lambda: (
        contextlib.nullcontext(), contextlib.nullcontext()))
    _, got = two_in_flight("full", 0.2)
    assert max((got[n] - want[n]).abs().max().item() for n in want) > 1e-4


def _live_bytes_module():
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_ce_memory.py"
    spec = importlib.util.spec_from_file_location("_bench_ce_memory_rc", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def held_after_forward(recompute, dropout, layers=3):
    """Bytes of storage a layers-only stage's forward creates and keeps alive (for its
    backward, and the output). Counted by storage, not by saved_tensors_hooks: a
    checkpointed region's inputs are held by the checkpoint, not saved through hooks."""
    bench = _live_bytes_module()
    model = build(recompute, dropout, layers, pre=False, post=False)
    x = torch.randn(S, B, H, requires_grad=True)
    live = bench.LiveTensorBytes()
    live.exclude(x, *model.parameters())
    with live:
        out = model(hidden=x)
    assert out.requires_grad
    return live.current


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_full_recompute_keeps_each_layers_input_only(dropout):
    layers, sbh = 3, S * B * H * 4
    # By hand: the output of each layer (the next one's input, the last the stage's
    # output), and the tensor-parallel stream's CPU state each layer notes for its replay.
    state = torch.get_rng_state().numel()
    assert held_after_forward("full", dropout, layers) == layers * (sbh + state)
    assert held_after_forward("none", dropout, layers) > 10 * layers * sbh


def test_selective_recompute_drops_the_attention_scores():
    layers = 3
    # CPU fp32 with attention dropout: SDPA's math path keeps the softmax output, its
    # dropout mask and the dropped probabilities, each a x s x s x b x 4 bytes per layer.
    scores = A * S * S * B * 4
    saved = held_after_forward("none", 0.1, layers) - held_after_forward("selective", 0.1,
                                                                         layers)
    assert saved >= layers * 3 * scores


def test_the_planner_counts_what_full_recompute_keeps():
    cfg = load_config(None, ["model.recompute=full", "model.seq_length=512",
                             "model.hidden_size=256", "model.num_attention_heads=8"])
    sb = P.saved_bytes(cfg, "cuda")
    assert P.layer_activation_bytes(cfg.model, 4, sb=sb) == 512 * 4 * 256 * 4  # fp32 input
    assert P.layer_activation_bytes(cfg.model, 4, 2, True, sb) == 512 * 4 * 256 * 4 / 2
    selective = load_config(None, ["model.recompute=selective", "model.seq_length=512",
                                   "model.hidden_size=256", "model.num_attention_heads=8"])
    none = load_config(None, ["model.seq_length=512", "model.hidden_size=256",
                              "model.num_attention_heads=8"])
    # the paper's count without the 5·a·s/h scores term: s·b·h·34 (t = 1)
    assert P.layer_activation_bytes(selective.model, 4) == 512 * 4 * 256 * 34
    assert P.layer_activation_bytes(none.model, 4) == 512 * 4 * 256 * (34 + 5 * 8 * 512 / 256)


# --- which weights a recomputed backward sees -----------------------------------------

def _stage_and_weights(recompute):
    torch.manual_seed(3)
    model = build(recompute, 0.0, layers=2, pre=False, post=False)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = {n: torch.randn_like(p) * 0.05 for n, p in model.named_parameters()}
    x = torch.randn(S, B, H, requires_grad=True)
    g = torch.randn(S, B, H)
    return model, w0, delta, x, g


def _layer_at(weights, index):
    """Layer ``index`` of a fresh no-recompute stage loaded with ``weights``."""
    ref = build("none", 0.0, layers=2, pre=False, post=False)
    ref.load_state_dict(weights)
    return ref.layers[str(index)]


def _vjp(layer, x, g):
    x = x.detach().requires_grad_(True)
    layer(x).backward(g)
    return x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _live_run(recompute):
    """PACI's policy: F(j) at W0, an update written through param.data, then B(j)."""
    model, w0, delta, x, g = _stage_and_weights(recompute)
    out = LiveWeights(model).forward(1, hidden=x)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.data.add_(delta[n])
    out.backward(g)
    w1 = {n: w0[n] + delta[n] for n in w0}
    return model, w0, w1, x, g


def test_live_weights_recompute_runs_each_layer_at_the_backward_time_weights():
    model, w0, w1, x, g = _live_run("full")
    # By hand, layer by layer: each recomputes from its forward-time input (layer 1's is
    # layer 0's output at W0), on the weights live at the backward, W1.
    x1 = _layer_at(w0, 0)(x.detach())
    g_x1, want1 = _vjp(_layer_at(w1, 1), x1, g)
    g_x, want0 = _vjp(_layer_at(w1, 0), x, g_x1)
    torch.testing.assert_close(x.grad, g_x, rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        want = (want0 if n.startswith("layers.0.") else want1)[n.split(".", 2)[2]]
        torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-6, msg=n)
    # Without recompute the saved activations are W0's: another gradient.
    plain, *_ = _live_run("none")
    assert max((p.grad - q.grad).abs().max().item()
               for p, q in zip(plain.parameters(), model.parameters(), strict=True)) > 1e-4


def _two_bw_run(recompute):
    """2BW's policy: F(1) on the stashed version 0, a STEP (storage moved, update, version
    1 published), then B(1), which must see version 0."""
    model, w0, delta, x, g = _stage_and_weights(recompute)
    grads: dict[int, torch.Tensor] = {}

    def accumulate(p, grad):
        grads[id(p)] = grads.get(id(p), 0) + grad

    def rebind():
        for p in model.parameters():
            p.data = p.data.clone()

    policy = TwoVersionStash(model, 1, accumulate, rebind)
    out = policy.forward(1, hidden=x)
    policy.before_step()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.data.add_(delta[n])
    policy.after_step()
    assert policy.live_versions() == 2
    out.backward(g)
    return {n: grads[id(p)] for n, p in model.named_parameters()}, x.grad, w0, x, g


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_two_bw_recompute_still_sees_the_stashed_version(recompute):
    got, got_x, w0, x, g = _two_bw_run(recompute)
    plain, plain_x, *_ = _two_bw_run("none")
    # The whole stage at W0, forward and backward: 2BW's B(1) with or without recompute.
    ref = build("none", 0.0, layers=2, pre=False, post=False)
    ref.load_state_dict(w0)
    xr = x.detach().requires_grad_(True)
    ref(hidden=xr).backward(g)
    torch.testing.assert_close(got_x, xr.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain_x, xr.grad, rtol=0, atol=1e-6)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(plain[n], p.grad, rtol=0, atol=1e-6, msg=n)
