"""The storage accounting behind scripts/bench_ce_memory.py counts what a hand count says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ce_memory.py"


def _module():
    spec = importlib.util.spec_from_file_location("_bench_ce_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_peak_counts_new_storage_once_and_sees_it_freed():
    bench = _module()
    x = torch.ones(1000)  # made before: its views and in-place ops are not new memory
    t = bench.LiveTensorBytes()
    t.exclude(x)
    with t:
        x.view(10, 100).mul_(2)
        a = x * 2  # 4000 bytes
        b = a.to(torch.float64)  # 8000
        v = b[:10]  # a view: nothing new
        del a  # 4000 freed
        c = torch.empty(250, dtype=torch.int64)  # 2000
        assert t.current == 8000 + 2000
        del b  # v still holds b's storage
        assert t.current == 10000
        del v
        assert t.current == 2000
    assert t.peak == 12000
    del c


def test_torch_cross_entropy_holds_fp32_copies_the_fused_one_does_not(monkeypatch):
    """By hand, per logit element (bf16 logits, 2 bytes): the torch path creates an fp32
    upcast and an fp32 softmax saved for backward, then fp32 and bf16 gradients, so its
    peak creates several times the logits; the fused path with inplace_backward creates
    only per-row numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    bench = _module()
    from megatron_paci.kernels.dispatch import select_kernels

    cpu = torch.device("cpu")
    tokens, vocab = 4, 1000
    fused = select_kernels("triton", [], cpu).cross_entropy
    inputs, created, loss = bench.measure(
        lambda x, t: fused(x, t, None, inplace_backward=True), tokens, vocab, cpu)
    assert inputs == tokens * vocab * 2 + tokens * 8
    assert created < 64 * tokens  # a few fp32/int64 numbers per row, nothing per element
    _, torch_created, torch_loss = bench.measure(
        select_kernels("torch", [], cpu).cross_entropy, tokens, vocab, cpu)
    assert torch_created >= 8 * tokens * vocab  # at least two fp32 logits-sized buffers
    assert abs(loss - torch_loss) <= 1e-5 * abs(torch_loss)
