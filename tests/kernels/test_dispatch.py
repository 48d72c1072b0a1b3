"""The dispatcher picks one implementation per op, says why, refuses what cannot
run, and the start-up parity check catches a wrong kernel."""

import pytest
import torch

from megatron_paci.kernels import dispatch
from megatron_paci.kernels.dispatch import KernelError, select_kernels
from megatron_paci.kernels.parity import Shapes, parity_check

pytest.importorskip("triton")
SHAPES = Shapes(seq=8, batch=2, hidden=32, ffn=64, heads=2, head_dim=16, vocab=96)


def test_auto_is_torch_on_cpu_with_reason():
    k = select_kernels("auto", [], torch.device("cpu"))
    assert {c.backend for c in k.choices.values()} == {"torch"}
    assert "auto: no CUDA device" in k.table()
    assert k.layer_norm is dispatch._TORCH["layer_norm"]
    # the torch reference adds no bias for free: the linear before it adds its own (addmm)
    assert not k.fuses_bias("bias_gelu") and not k.fuses_bias("bias_dropout_add")
    # torch's fused AdamW kernel on CPU as well (one pass per parameter)
    assert k.adamw([{"params": [torch.zeros(2)]}], 1e-3, (0.9, 0.95), 1e-8).defaults["fused"]


def test_triton_through_the_interpreter_and_overrides(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k = select_kernels("triton", ["cross_entropy=torch"], torch.device("cpu"))
    assert k.choices["layer_norm"].backend == "triton"
    assert k.choices["cross_entropy"].backend == "torch"
    assert "override" in k.choices["cross_entropy"].why
    assert k.layer_norm.__module__ == "megatron_paci.kernels.triton_norms"
    assert k.fuses_bias("bias_gelu") and k.fuses_bias("bias_dropout_add")
    assert not select_kernels("triton", ["bias_gelu=torch"]).fuses_bias("bias_gelu")


@pytest.mark.parametrize("backend,overrides,needle", [
    ("triton", [], "kernel op 'layer_norm': backend 'triton' (kernels.backend) cannot run: "
                   "no CUDA device and TRITON_INTERPRET is not 1; choices: torch (always)"),
    ("apex", [], "kernel op 'layer_norm': backend 'apex' (kernels.backend) cannot run"),
    ("torch", ["rotary=apex"], "kernel op 'rotary': backend 'apex' (override)"),
    ("torch", ["gelu=torch"], "unknown op 'gelu'; ops: layer_norm"),
    ("torch", ["layer_norm"], "must look like op=backend"),
    ("cuda", [], "kernels.backend='cuda' is not one of auto, torch, triton, apex"),
])
def test_unavailable_backends_name_op_backend_and_choices(monkeypatch, backend, overrides,
                                                          needle):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelError) as e:
        select_kernels(backend, overrides, torch.device("cpu"))
    assert needle in str(e.value)


@pytest.fixture
def triton_device(kernel_device, monkeypatch):
    """The kernel-test device, with Triton runnable on it (the interpreter on a CPU)."""
    if kernel_device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return kernel_device


def test_parity_check_passes_for_every_triton_kernel(triton_device):
    k = select_kernels("triton", [], triton_device)
    report = parity_check(k, SHAPES, torch.float32, triton_device)
    assert [line.split()[0] for line in report] == list(dispatch.COVERS["triton"])
    assert k.choices["adamw"].backend == "torch"  # Triton has no AdamW


def test_parity_check_refuses_a_wrong_kernel(triton_device):
    k = select_kernels("torch", ["bias_gelu=triton"], triton_device)
    right = k.bias_gelu
    k.bias_gelu = lambda x, b: right(x, b) * 1.01  # a kernel that is 1% off
    with pytest.raises(KernelError, match="op 'bias_gelu' \\(triton\\) output differs"):
        parity_check(k, SHAPES, torch.float32, triton_device)


def test_parity_check_turns_a_kernel_that_raises_into_a_clear_refusal(triton_device):
    k = select_kernels("torch", ["rotary=triton"], triton_device)

    def broken(x, cos, sin):
        raise RuntimeError("no kernel image is available for execution on the device")

    k.rotary = broken
    with pytest.raises(KernelError) as e:
        parity_check(k, SHAPES, torch.float32, triton_device)
    assert str(e.value).startswith(
        "kernel parity check failed: op 'rotary' (triton) raised RuntimeError on the run's "
        "shapes (torch.float32, ")
    assert str(e.value).endswith("no kernel image is available for execution on the device; "
                                 "choose another backend with kernels.overrides=[rotary=torch]")
