"""Every Triton kernel compiles for Hopper (sm_90a) at GPT-2 Medium's shapes, without
spilling registers, on a machine without a GPU.

The other kernel tests run Triton's interpreter, which never lowers a kernel to GPU
code; scripts/compile_kernels.py records the launches the wrappers make at the
benchmark shapes and compiles each with Triton's compiler and the ptxas it ships.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Forward and backward of layer_norm, rms_norm, bias_gelu, bias_dropout_add and
# cross_entropy, and rotary's one kernel in both directions.
KERNELS = {"_layer_norm_fwd", "_layer_norm_bwd", "_rms_norm_fwd", "_rms_norm_bwd",
           "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_bda_fwd_kernel",
           "_bda_bwd_kernel", "_rotary_kernel", "_ce_forward_kernel", "_ce_backward_kernel"}


@pytest.mark.slow
@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this triton install ships no cuobjdump")
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "compiled.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"),
                           "--shapes", "gpt2-medium", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {r["kernel"] for r in results} == KERNELS
    rotary = [r for r in results if r["kernel"] == "_rotary_kernel"]
    assert sorted(r["constexprs"]["BACKWARD"] for r in rotary) == [False, True]
    for r in results:
        assert r["error"] == "", r
        assert r["usage"]["REG"] <= 255, r  # the hardware's limit per thread
        assert r["usage"]["STACK"] == 0 and r["usage"]["LOCAL"] == 0, f"spills: {r}"
    assert "12 distinct launches: 12 compiled, 0 failed; 0 with spills." in proc.stdout
