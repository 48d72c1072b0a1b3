"""One dispatcher: which implementation runs each fused op, and why.

``kernels.backend=auto|triton|torch|apex`` picks for every op; ``kernels.overrides``
(``[layer_norm=torch, cross_entropy=triton]``) picks per op. ``auto`` means
Triton on CUDA (when triton imports) and the torch reference elsewhere; apex
is used only when asked for and importable. A backend that cannot run is
refused before training with the op, the backend and the choices named.

Not every backend has every op (``COVERS``): Triton has no AdamW, apex only its
fused norms and FusedAdam. A whole-run ``kernels.backend`` falls back to ``auto``
for an op it lacks, and says so in the table; an override naming a backend
that lacks the op is refused.

Every op has the same call signature in every backend, so the model calls
``kernels.layer_norm(...)`` and never knows which one it got. ``adamw`` is the
one op that is a builder: ``kernels.adamw(param_groups, lr, betas, eps)``
returns the optimizer that ``optim/`` drives.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_paci.kernels import reference
from megatron_paci.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

OPS = ("layer_norm", "rms_norm", "bias_gelu", "bias_dropout_add", "rotary", "cross_entropy",
       "adamw")
BACKENDS = ("auto", "torch", "triton", "apex")
COVERS = {
    "torch": OPS,
    "triton": tuple(op for op in OPS if op != "adamw"),
    "apex": ("layer_norm", "rms_norm", "adamw"),
}
# The compiled extension each apex op needs: a Python-only apex build imports
# fine but fails at the first call, so availability is decided by these.
_APEX_EXTENSIONS = {
    "layer_norm": ("apex.normalization.fused_layer_norm", "fused_layer_norm_cuda"),
    "rms_norm": ("apex.normalization.fused_layer_norm", "fused_layer_norm_cuda"),
    "adamw": ("apex.optimizers", "amp_C"),
}
_TRITON_MODULES = {
    "layer_norm": "megatron_paci.kernels.triton_norms",
    "rms_norm": "megatron_paci.kernels.triton_norms",
    "bias_gelu": "megatron_paci.kernels.triton_elementwise",
    "bias_dropout_add": "megatron_paci.kernels.triton_elementwise",
    "rotary": "megatron_paci.kernels.triton_elementwise",
    "cross_entropy": "megatron_paci.kernels.triton_cross_entropy",
}


class KernelError(ValueError):
    """A requested kernel backend cannot run here, or failed its parity check."""


def _torch_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                         inplace_backward: bool = False):
    return vocab_parallel_cross_entropy(logits, target, group)


def _torch_bias_dropout_add(x, bias, residual, p, training, seed=None):
    return reference.bias_dropout_add(x, bias, residual, p, training)


def _torch_adamw(param_groups: list[dict], lr: float, betas: tuple[float, float],
                 eps: float) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` with its fused kernel, on CUDA and on CPU alike: on CPU it is
    one pass per parameter instead of foreach's several (timed in docs/benchmarks.md)."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=True)


_TORCH: dict[str, Callable] = {
    "layer_norm": reference.layer_norm,
    "rms_norm": reference.rms_norm,
    "bias_gelu": reference.bias_gelu,
    "bias_dropout_add": _torch_bias_dropout_add,
    "rotary": reference.rotary,
    "cross_entropy": _torch_cross_entropy,
    "adamw": _torch_adamw,
}


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device``, and why (not)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, "CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "CPU through TRITON_INTERPRET=1"
    return False, "no CUDA device and TRITON_INTERPRET is not 1"


def apex_status(op: str) -> tuple[bool, str]:
    """Whether NVIDIA apex can run ``op`` (one of ``COVERS["apex"]``) here, and why (not)."""
    if importlib.util.find_spec("apex") is None:
        return False, "NVIDIA apex is not installed"
    module, extension = _APEX_EXTENSIONS[op]
    try:
        importlib.import_module(module)
    except Exception as e:  # the PyPI package named apex is unrelated and lacks this
        return False, f"apex is importable but has no {module} ({type(e).__name__})"
    if importlib.util.find_spec(extension) is None:
        return False, f"apex was built without its CUDA extension {extension}"
    return True, "apex installed"


def _apex_impl(op: str) -> Callable:
    if op == "adamw":
        fused_adam = importlib.import_module("apex.optimizers").FusedAdam

        def build(param_groups, lr, betas, eps):
            # adam_w_mode: decoupled weight decay, the arithmetic of torch's AdamW.
            return fused_adam(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True,
                              bias_correction=True)
        return build
    fln = importlib.import_module("apex.normalization.fused_layer_norm")
    if op == "layer_norm":
        return lambda x, w, b, eps: fln.fused_layer_norm_affine(x, w, b, w.shape, eps)
    return lambda x, w, eps: fln.fused_rms_norm_affine(x, w, w.shape, eps)


@dataclass(frozen=True)
class Choice:
    op: str
    backend: str
    why: str


# Backends whose bias_gelu / bias_dropout_add add the bias in the same pass over memory
# as the rest of the op. The torch reference would add it as one more pass; there the
# linear layer before it adds the bias inside its GEMM (addmm) instead.
_FUSES_BIAS = frozenset({"triton"})


class Kernels:
    """The chosen implementation of every op (attributes named after the ops)."""

    def __init__(self, choices: dict[str, Choice], fns: dict[str, Callable]):
        self.choices = choices
        for op, fn in fns.items():
            setattr(self, op, fn)

    def fuses_bias(self, op: str) -> bool:
        """Whether the linear layer before ``op`` should leave its bias to ``op``
        (``skip_bias_add``): true where ``op``'s kernel adds it for free."""
        return self.choices[op].backend in _FUSES_BIAS

    def table(self) -> str:
        width = max(len(op) for op in OPS)
        lines = [f"  {'op':<{width}}  {'backend':<7}  why"]
        lines += [f"  {c.op:<{width}}  {c.backend:<7}  {c.why}" for c in self.choices.values()]
        return "kernels:\n" + "\n".join(lines)


def _parse_overrides(overrides: list[str]) -> dict[str, str]:
    out = {}
    for item in overrides:
        op, sep, backend = str(item).partition("=")
        if not sep:
            raise KernelError(f"kernels.overrides entry '{item}' must look like op=backend")
        if op not in OPS:
            raise KernelError(f"kernels.overrides: unknown op '{op}'; ops: {', '.join(OPS)}")
        if backend not in BACKENDS:
            raise KernelError(f"kernels.overrides: backend '{backend}' for op '{op}' is not one "
                              f"of {', '.join(BACKENDS)}")
        out[op] = backend
    return out


def _choices_text(op: str, device: torch.device) -> str:
    parts = ["torch (always)"]
    if op in COVERS["triton"]:
        t_ok, t_why = triton_status(device)
        parts.append(f"triton ({'available' if t_ok else t_why})")
    if op in COVERS["apex"]:
        a_ok, a_why = apex_status(op)
        parts.append(f"apex ({'available' if a_ok else a_why})")
    return "choices: " + ", ".join(parts)


def _auto(op: str, device: torch.device, t_ok: bool, t_why: str, prefix: str = "") -> Choice:
    if op in COVERS["triton"] and device.type == "cuda" and t_ok:
        return Choice(op, "triton", f"{prefix}auto: CUDA device, triton available")
    if op not in COVERS["triton"]:
        reason = "torch's fused AdamW"
    else:
        reason = "no CUDA device" if device.type != "cuda" else t_why
    return Choice(op, "torch", f"{prefix}auto: {reason}")


def select_kernels(backend: str = "auto", overrides: list[str] | None = None,
                   device: torch.device | None = None) -> Kernels:
    """Resolve every op to one implementation; raise KernelError for one that cannot run."""
    device = device or torch.device("cpu")
    if backend not in BACKENDS:
        raise KernelError(f"kernels.backend='{backend}' is not one of {', '.join(BACKENDS)}")
    per_op = _parse_overrides(overrides or [])
    t_ok, t_why = triton_status(device)
    choices: dict[str, Choice] = {}
    fns: dict[str, Callable] = {}
    for op in OPS:
        asked = per_op.get(op, backend)
        source = "override" if op in per_op else "kernels.backend"
        if asked != "auto" and op not in COVERS[asked]:
            if source == "override":
                raise KernelError(f"kernel op '{op}': backend '{asked}' (override) has no "
                                  f"'{op}'; {asked} covers {', '.join(COVERS[asked])}; "
                                  f"{_choices_text(op, device)}")
            choice = _auto(op, device, t_ok, t_why, prefix=f"kernels.backend={asked} has no "
                                                           f"{op}, so ")
        elif asked == "auto":
            choice = _auto(op, device, t_ok, t_why)
        elif asked == "triton":
            if not t_ok:
                raise KernelError(f"kernel op '{op}': backend 'triton' ({source}) cannot run: "
                                  f"{t_why}; {_choices_text(op, device)}")
            choice = Choice(op, "triton", f"{source}: {t_why}")
        elif asked == "apex":
            a_ok, a_why = apex_status(op)
            if not a_ok:
                raise KernelError(f"kernel op '{op}': backend 'apex' ({source}) cannot run: "
                                  f"{a_why}; {_choices_text(op, device)}")
            choice = Choice(op, "apex", f"{source}: {a_why}")
        else:
            choice = Choice(op, "torch", f"{source}: reference implementation")
        choices[op] = choice
        fns[op] = _implementation(op, choice.backend)
    return Kernels(choices, fns)


def _implementation(op: str, backend: str) -> Callable:
    if backend == "torch":
        return _TORCH[op]
    if backend == "apex":
        return _apex_impl(op)
    return getattr(importlib.import_module(_TRITON_MODULES[op]), op)


def reference_kernels() -> Kernels:
    """Every op on the torch reference (the default for models built without a config)."""
    return select_kernels("torch")
