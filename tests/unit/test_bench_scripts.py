"""The GPU benchmark scripts stay runnable: both run end to end with --smoke on the CPU,
and so does scripts/gpu_check.sh, the one-call GPU check, with --cpu-smoke.

Their real runs need a GPU (see docs/kernels.md); these runs only keep the code paths
from rotting, so they check what the scripts print, not the numbers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
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
    # The smoke runs here are about the scripts, so they stay on the torch references
    # (fast). TRITON_INTERPRET stays as conftest set it: a triton imported without it
    # (torch imports triton on the way) would leave later kernels uninterpreted.
    from megatron_paci.kernels import dispatch

    monkeypatch.setattr(dispatch, "triton_status",
                        lambda device: (False, "left out by this test"))


def test_bench_kernels_smoke_prints_every_op(tmp_path, capsys, torch_only):
    bench = _load("bench_kernels")
    out_file = tmp_path / "kernels.md"
    assert bench.main(["--smoke", "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out == out_file.read_text()
    assert "Copy bandwidth" in out and "| op | impl | fwd ms |" in out
    for op in OPS:
        if op == "adamw":  # an optimizer step: its own table and formula
            assert "- `adamw`: step: read parameter, gradient" in out
            assert "| impl | step ms | GB/s | % copy | timing |" in out
            assert "| torch | " in out and "| foreach | " in out
            continue
        assert f"| {op} | torch | " in out, op
        assert f"- `{op}`: fwd: " in out, op  # the bytes formula of every op
    assert "failed" not in out
    assert "triton: not run" in out and "torch.compile: not run (--smoke)" in out


def test_norm_tile_sweep_times_each_tile_and_puts_the_picker_back(capsys):
    pytest.importorskip("triton")  # through the interpreter (tests/conftest.py)
    from megatron_paci.kernels import triton_norms

    picker = triton_norms._tile
    bench = _load("bench_kernels")
    assert bench.main(["--smoke", "--sweep-norm-tiles"]) == 0
    out = capsys.readouterr().out
    assert "### Norm tiles at smoke: 32 rows x h=64" in out
    for op in ("layer_norm", "rms_norm"):
        for block_m, warps in bench.SMOKE_NORM_TILES:
            assert f"| {op} | BLOCK_M={block_m}, warps={warps} | " in out
    assert "failed" not in out
    assert triton_norms._tile is picker


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


GPU_CHECK = SCRIPTS / "gpu_check.sh"
needs_shell = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                 reason="needs bash and coreutils' timeout")


@needs_shell
def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


@pytest.mark.slow
@needs_shell
def test_gpu_check_cpu_smoke_runs_every_step(tmp_path):
    """The script a GPU session runs in one call keeps working between sessions: its
    --cpu-smoke mode (about 15 s) runs the same steps on the CPU and writes the same
    files, each step's exit status in summary.txt."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "MEGATRON_PACI_TEST_DEVICE", "OUT")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    out = tmp_path / "gpu_out"
    proc = subprocess.run(["bash", str(GPU_CHECK), "--cpu-smoke", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    files = {p.name for p in out.iterdir()}
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8  # the device's limit
    assert files == {"env.txt", "kernel_tests.txt", "bench_kernels.txt", "kernels_gpu.md",
                     "bench_mfu.txt", "train_gpu.txt", "summary.txt"}
    lines = (out / "summary.txt").read_text().splitlines()
    status = {line.split()[0]: line.split()[1] for line in lines[1:-1]}
    assert status == {"env": "0", "kernel_tests": "0", "bench_kernels": "0", "ce_memory": "0",
                      "bench_mfu": "0", "train_gpu": "0", "train_medium": "0",
                      "bench_mfu_torch": "skipped", "norm_tiles": "skipped",
                      "bench_mfu_compile": "skipped",
                      "bench_kernels_compile": "skipped"}
    assert lines[-1].startswith("total ")
    assert "torch " in (out / "env.txt").read_text()
    assert " passed" in (out / "kernel_tests.txt").read_text()
    assert "| layer_norm | torch | " in (out / "kernels_gpu.md").read_text()
    assert "MFU: " in (out / "bench_mfu.txt").read_text()
    assert "vocab 1000: fused/torch peak" in (out / "bench_kernels.txt").read_text()
    train = (out / "train_gpu.txt").read_text()
    assert "exiting at iteration 2" in train and "resumed from" in train
    assert " iteration        4/       4 |" in train
    # GPT-2 Medium's config through pretrain_gpt.py (2 layers here), on random tokens.
    assert "random tokens: " in train and " iteration        2/       2 |" in train
    assert "=== summary" in proc.stdout  # every step's output is shown as well


def test_resident_warps_follow_hoppers_limits():
    ck = _load("compile_kernels")

    def warps(regs, num_warps, shared=1024):
        return ck.Compiled("k", {}, num_warps, 0.0, {"REG": regs, "SHARED": shared}) \
            .resident_warps()

    # 192 registers x 32 threads = 6144 per warp; 4 warps a program -> 2 programs.
    assert warps(192, 4) == 8
    assert warps(48, 8) == 40  # 1536 per warp, 12288 a program -> 5 programs
    assert warps(26, 4) == 64  # 832 rounds up to 1024 per warp: the 64-warp limit binds
    assert warps(32, 4, shared=100 * 1024) == 8  # 2 programs fit in 228 KiB of shared
