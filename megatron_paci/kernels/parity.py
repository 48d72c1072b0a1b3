"""Start-up parity check: every non-reference kernel against its reference, on the
run's real shapes and dtype, forward and backward, before any training step.

A kernel that disagrees stops the run (KernelError) instead of training a
model silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_paci.kernels.dispatch import _TORCH, OPS, KernelError, Kernels


@dataclass(frozen=True)
class Shapes:
    seq: int
    batch: int
    hidden: int
    ffn: int  # per tensor-parallel rank
    heads: int  # per tensor-parallel rank
    head_dim: int
    vocab: int  # per tensor-parallel rank
    vocab_total: int = 0  # targets are drawn over the whole (padded) vocabulary


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def _cases(s: Shapes, dtype: torch.dtype, device: torch.device, group,
           gen: torch.Generator) -> dict[str, tuple[tuple, list[int]]]:
    """Per op: (arguments, indices of the arguments whose gradients are compared)."""
    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    x = rnd(s.seq, s.batch, s.hidden)
    w, b = rnd(s.hidden, dt=torch.float32) + 1.0, rnd(s.hidden, dt=torch.float32)
    half = s.head_dim // 2
    angles = torch.outer(torch.arange(s.seq, dtype=torch.float32),
                         torch.rand(half, generator=gen))
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(device)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(device)
    vocab_total = s.vocab_total or s.vocab
    target = torch.randint(0, vocab_total, (s.seq, s.batch), generator=gen).to(device)
    return {
        "layer_norm": ((x, w, b, 1e-5), [0, 1, 2]),
        "rms_norm": ((x, w, 1e-5), [0, 1]),
        "bias_gelu": ((rnd(s.seq, s.batch, s.ffn), rnd(s.ffn, dt=torch.float32)), [0, 1]),
        "bias_dropout_add": ((rnd(s.seq, s.batch, s.hidden), rnd(s.hidden, dt=torch.float32),
                              rnd(s.seq, s.batch, s.hidden, dt=torch.float32), 0.0, True),
                             [0, 1, 2]),
        "rotary": ((rnd(s.batch, s.heads, s.seq, s.head_dim), cos, sin), [0]),
        "cross_entropy": ((rnd(s.seq, s.batch, s.vocab, scale=2.0), target, group), [0]),
    }


def _run(fn: Callable, args: tuple, grad_idx: list[int], gen: torch.Generator):
    args = tuple(a.detach().clone().requires_grad_(i in grad_idx)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for i, a in enumerate(args))
    out = fn(*args)
    g = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    out.backward(g)
    return [out.detach().float()] + [args[i].grad.float() for i in grad_idx]


def _adamw_steps(build: Callable, shapes: Shapes, device: torch.device, seed: int,
                 steps: int = 3) -> list[torch.Tensor]:
    """Parameters after a few AdamW steps on fixed gradients, one decayed group and one
    not (the optimizer's real grouping), fp32 as the optimizer keeps them."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shapes.hidden, shapes.ffn, generator=gen).to(device)
    b = torch.randn(shapes.ffn, generator=gen).to(device)
    grads = [(torch.randn(w.shape, generator=gen).to(device),
              torch.randn(b.shape, generator=gen).to(device)) for _ in range(steps)]
    opt = build([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for gw, gb in grads:
        w.grad, b.grad = gw, gb
        opt.step()
    return [w, b]


def _check_adamw(kernels: Kernels, backend: str, shapes: Shapes, device: torch.device,
                 seed: int) -> float:
    got = _adamw_steps(kernels.adamw, shapes, device, seed)
    want = _adamw_steps(_TORCH["adamw"], shapes, device, seed)
    worst = max(((a - b).abs().max() / b.abs().max()).item()
                for a, b in zip(got, want, strict=True))
    if not worst <= 1e-5:
        raise KernelError(
            f"kernel parity check failed: op 'adamw' ({backend}) parameters after 3 steps "
            f"differ from torch.optim.AdamW by {worst:.2e} (relative to their max; allowed "
            f"1e-05); choose another backend with kernels.overrides=[adamw=torch]")
    return worst


def _check_op(op: str, kernels: Kernels, backend: str, shapes: Shapes, dtype: torch.dtype,
              device: torch.device, group, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    args, grad_idx = _cases(shapes, dtype, device, group, gen)[op]
    got = _run(getattr(kernels, op), args, grad_idx, torch.Generator().manual_seed(seed))
    want = _run(_TORCH[op], args, grad_idx, torch.Generator().manual_seed(seed))
    names = ["output"] + [f"grad[{i}]" for i in grad_idx]
    tol = _tolerance(dtype)
    worst = 0.0
    for name, a, b in zip(names, got, want, strict=True):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        worst = max(worst, err)
        if not err <= tol:
            raise KernelError(
                f"kernel parity check failed: op '{op}' ({backend}) {name} differs "
                f"from the torch reference by {err:.2e} (relative to its max; allowed "
                f"{tol:.0e}) on shape {tuple(args[0].shape)} {dtype}; choose another "
                f"backend with kernels.overrides=[{op}=torch]")
    return worst


def parity_check(kernels: Kernels, shapes: Shapes, dtype: torch.dtype, device: torch.device,
                 group=None, seed: int = 0) -> list[str]:
    """Compare each non-torch kernel with its reference; one line per op checked.

    A kernel that raises (fails to compile, wrong device, missing extension) is
    reported the same way as one that disagrees: op, backend and the way out.
    """
    report = []
    for op in OPS:
        backend = kernels.choices[op].backend
        if backend == "torch":
            continue
        try:
            if op == "adamw":
                worst = _check_adamw(kernels, backend, shapes, device, seed)
            else:
                worst = _check_op(op, kernels, backend, shapes, dtype, device, group, seed)
        except KernelError:
            raise
        except Exception as e:
            msg = " ".join(str(e).split())[:300]
            raise KernelError(
                f"kernel parity check failed: op '{op}' ({backend}) raised "
                f"{type(e).__name__} on the run's shapes ({dtype}, {device}): {msg}; choose "
                f"another backend with kernels.overrides=[{op}=torch]") from e
        report.append(f"  {op:<16} {backend:<7} max relative error {worst:.1e}")
    return report
