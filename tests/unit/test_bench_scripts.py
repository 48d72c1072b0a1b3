"""The GPU benchmark scripts stay runnable: both run end to end with --smoke on the CPU.

Their real runs need a GPU (see docs/kernels.md); these runs only keep the code paths
from rotting, so they check what the scripts print, not the numbers.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from megatron_paci.kernels.dispatch import OPS

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_only(monkeypatch):
    # conftest turns the Triton interpreter on for CPU machines; the smoke runs here
    # are about the scripts, so they stay on the torch references (fast).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_bench_kernels_smoke_prints_every_op(tmp_path, capsys, torch_only):
    bench = _load("bench_kernels")
    out_file = tmp_path / "kernels.md"
    assert bench.main(["--smoke", "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out == out_file.read_text()
    assert "Copy bandwidth" in out and "| op | impl | fwd ms |" in out
    for op in OPS:
        assert f"| {op} | torch | " in out, op
        assert f"- `{op}`: fwd: " in out, op  # the bytes formula of every op
    assert "failed" not in out
    assert "triton: not run" in out and "torch.compile: not run (--smoke)" in out


def test_bench_kernels_bytes_follow_the_formulas():
    bench = _load("bench_kernels")
    s = bench.SMOKE_SHAPES[0]
    T, h, f, V = s.tokens, s.hidden, s.ffn, s.vocab
    want = {"layer_norm": (2 * T * h, 3 * T * h), "rms_norm": (2 * T * h, 3 * T * h),
            "bias_gelu": (2 * T * f, 3 * T * f), "bias_dropout_add": (3 * T * h, 2 * T * h),
            "cross_entropy": (T * V, 2 * T * V)}
    for op, (fwd, bwd) in want.items():
        case = bench.make_case(op, s, torch.device("cpu"), torch.bfloat16)
        assert (case.fwd_bytes, case.bwd_bytes) == (2 * fwd, 2 * bwd), op
    rot = bench.make_case("rotary", s, torch.device("cpu"), torch.bfloat16)
    assert rot.fwd_bytes == 2 * T * h * 2 + 2 * s.seq * s.head_dim * 4


def test_bench_mfu_smoke_prints_mfu_and_formula(capsys, torch_only):
    bench = _load("bench_mfu")
    assert bench.main(["--smoke", "--peak-tflops", "1"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out
    assert "tokens/s: " in out and "model TFLOP/s: " in out
    assert "FLOPs/token = 6·(L·(4h² + 2hf) + hV) + 6·L·s·h" in out
    assert "causal attention counted as half" in out
    assert any(line.startswith("MFU: ") and "of 1 TFLOP/s dense bf16 peak" in line
               for line in out.splitlines())


def test_dense_peaks_by_device_name():
    bench = _load("bench_mfu")
    assert bench.dense_peak_tflops("NVIDIA H200") == 989.0
    assert bench.dense_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.dense_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.dense_peak_tflops("cpu") is None
