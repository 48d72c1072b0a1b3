"""NVIDIA apex is optional: used where importable, refused clearly where not.

apex cannot be built on this CPU machine, so these tests put tests/fake_apex (apex's
import paths and contracts in plain torch) on ``sys.path``. What they pin down is
megatron_paci's side: which ops the dispatcher gives to apex, the fallbacks it
names, the parity check, and that FusedAdam (steps counted per group) trains and
checkpoints like ``torch.optim.AdamW``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_paci.config.schema import OptimConfig
from megatron_paci.kernels.dispatch import KernelError, select_kernels
from megatron_paci.kernels.parity import Shapes, parity_check
from megatron_paci.optim.optimizer import Optimizer
from megatron_paci.parallel.state import single_process

FAKE_APEX = Path(__file__).resolve().parents[1] / "fake_apex"
CPU = torch.device("cpu")
SHAPES = Shapes(seq=8, batch=2, hidden=32, ffn=64, heads=2, head_dim=16, vocab=96)


def _forget_apex() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("apex", "amp_C", "fused_layer_norm_cuda"):
            del sys.modules[name]


@pytest.fixture
def apex(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_APEX))
    _forget_apex()
    yield
    _forget_apex()


@pytest.fixture
def apex_without_amp_c(tmp_path, monkeypatch):
    """An apex whose multi-tensor extension was not built (a Python-only install)."""
    (tmp_path / "apex").symlink_to(FAKE_APEX / "apex")
    (tmp_path / "fused_layer_norm_cuda.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    _forget_apex()
    yield
    _forget_apex()


def test_backend_apex_takes_what_apex_has_and_names_the_fallbacks(apex):
    k = select_kernels("apex", [], CPU)
    backends = {op: c.backend for op, c in k.choices.items()}
    assert backends == {"layer_norm": "apex", "rms_norm": "apex", "adamw": "apex",
                        "bias_gelu": "torch", "bias_dropout_add": "torch", "rotary": "torch",
                        "cross_entropy": "torch"}
    assert k.choices["bias_gelu"].why == ("kernels.backend=apex has no bias_gelu, so auto: "
                                          "no CUDA device")
    assert "  adamw" in k.table()
    assert type(k.adamw([{"params": [torch.zeros(2)]}], 1e-3, (0.9, 0.95), 1e-8)).__module__ \
        == "apex.optimizers"


def test_apex_built_without_its_extension_is_refused_by_name(apex_without_amp_c):
    assert select_kernels("torch", ["layer_norm=apex"], CPU).choices["layer_norm"].backend \
        == "apex"
    with pytest.raises(KernelError) as e:
        select_kernels("torch", ["adamw=apex"], CPU)
    assert str(e.value).startswith(
        "kernel op 'adamw': backend 'apex' (override) cannot run: apex was built without its "
        "CUDA extension amp_C; choices: torch (always), apex (")


def test_an_override_to_a_backend_without_the_op_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(KernelError, match="kernel op 'adamw': backend 'triton' \\(override\\) "
                                          "has no 'adamw'; triton covers layer_norm"):
        select_kernels("torch", ["adamw=triton"], CPU)
    # A whole-run triton backend keeps torch's AdamW and says why.
    k = select_kernels("triton", [], CPU)
    assert k.choices["adamw"].backend == "torch"
    assert k.choices["adamw"].why.startswith("kernels.backend=triton has no adamw")


def test_parity_check_runs_apex_and_refuses_a_wrong_fused_adam(apex):
    k = select_kernels("apex", [], CPU)
    report = parity_check(k, SHAPES, torch.float32, CPU)
    assert [line.split()[:2] for line in report] == [
        ["layer_norm", "apex"], ["rms_norm", "apex"], ["adamw", "apex"]]
    right = k.adamw
    k.adamw = lambda groups, lr, betas, eps: right(groups, lr * 1.01, betas, eps)
    with pytest.raises(KernelError, match="op 'adamw' \\(apex\\) parameters after 3 steps"):
        parity_check(k, SHAPES, torch.float32, CPU)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(opt: Optimizer, model: torch.nn.Module, steps: range) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(i)
        opt.zero_grad()
        model(torch.randn(6, 8, generator=g)).pow(2).mean().backward()
        opt.step(lr=1e-2)


CFG = OptimConfig(lr=1e-2, weight_decay=0.1, clip_grad=1.0)


def test_fused_adam_trains_like_torch_adamw_and_resumes_its_group_steps(apex):
    ref_model, apex_model = _model(), _model()
    ref = Optimizer(ref_model, CFG, single_process())
    fused = Optimizer(apex_model, CFG, single_process(), kernels=select_kernels("apex", [], CPU))
    assert type(fused.adamw).__module__ == "apex.optimizers"
    _train(ref, ref_model, range(5))
    _train(fused, apex_model, range(5))
    for a, b in zip(apex_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # The checkpoint view has torch's per-parameter layout, step included.
    state = {k: v.clone() for k, v in fused.state_by_name().items()}
    assert state.keys() == ref.state_by_name().keys()
    assert {v.item() for k, v in state.items() if k.endswith(".step")} == {5.0}

    # A fresh FusedAdam filled through the checkpoint path continues exactly like the
    # uninterrupted one (bias correction depends on the restored step count).
    resumed_model = _model()
    resumed_model.load_state_dict(apex_model.state_dict())
    resumed = Optimizer(resumed_model, CFG, single_process(),
                        kernels=select_kernels("apex", [], CPU))
    targets = resumed.state_by_name(create=True)  # what the checkpoint loader fills
    for key, target in targets.items():
        target.copy_(state[key])
    resumed.load_state_by_name(targets)
    assert [g["step"] for g in resumed.adamw.param_groups] == [5, 5]
    _train(fused, apex_model, range(5, 8))
    _train(resumed, resumed_model, range(5, 8))
    for a, b in zip(resumed_model.parameters(), apex_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_torch_adamw_resumes_from_a_fused_adam_state(apex):
    """One checkpoint format: apex's state loads into torch's AdamW and trains on alike."""
    apex_model, torch_model = _model(), _model()
    fused = Optimizer(apex_model, CFG, single_process(), kernels=select_kernels("apex", [], CPU))
    _train(fused, apex_model, range(4))
    torch_model.load_state_dict(apex_model.state_dict())
    plain = Optimizer(torch_model, CFG, single_process())
    source = fused.state_by_name()
    for key, target in plain.state_by_name(create=True).items():
        target.copy_(source[key])
    _train(fused, apex_model, range(4, 7))
    _train(plain, torch_model, range(4, 7))
    for a, b in zip(torch_model.parameters(), apex_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_zero1_refuses_fused_adam_with_the_keys_to_change(apex):
    cfg = OptimConfig(distributed_optimizer=True)
    with pytest.raises(ValueError, match="optim.distributed_optimizer=true runs its own sharded "
                                         "AdamW, so kernel op 'adamw' cannot be apex"):
        Optimizer(_model(), cfg, single_process(), kernels=select_kernels("apex", [], CPU))
