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


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _case(op: str, s: Shapes, dtype: torch.dtype, device: torch.device, group,
          gen: torch.Generator) -> tuple[tuple, list[int]]:
    """One op's arguments and the indices of those whose gradients are compared. Drawn on
    the device (a CPU generator for a large run's vocab-sized logits would take seconds),
    and only for ``op``."""
    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt)

    def f32(*shape):
        return rnd(*shape, dt=torch.float32)

    if op == "layer_norm":
        return (rnd(s.seq, s.batch, s.hidden), f32(s.hidden) + 1.0, f32(s.hidden), 1e-5), [0, 1, 2]
    if op == "rms_norm":
        return (rnd(s.seq, s.batch, s.hidden), f32(s.hidden) + 1.0, 1e-5), [0, 1]
    if op == "bias_gelu":
        return (rnd(s.seq, s.batch, s.ffn), f32(s.ffn)), [0, 1]
    if op == "bias_dropout_add":
        return ((rnd(s.seq, s.batch, s.hidden), f32(s.hidden), f32(s.seq, s.batch, s.hidden),
                 0.0, True), [0, 1, 2])
    if op == "rotary":
        angles = torch.outer(torch.arange(s.seq, dtype=torch.float32, device=device),
                             torch.rand(s.head_dim // 2, generator=gen, device=device))
        cos = torch.cat([angles.cos(), angles.cos()], -1)
        sin = torch.cat([angles.sin(), angles.sin()], -1)
        return (rnd(s.batch, s.heads, s.seq, s.head_dim), cos, sin), [0]
    if op == "cross_entropy":
        target = torch.randint(0, s.vocab_total or s.vocab, (s.seq, s.batch), generator=gen,
                               device=device)
        return (rnd(s.seq, s.batch, s.vocab, scale=2.0), target, group), [0]
    raise ValueError(f"no parity case for op '{op}'")


def _run(fn: Callable, args: tuple, grad_idx: list[int], gen: torch.Generator):
    args = tuple(a.detach().clone().requires_grad_(i in grad_idx)
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for i, a in enumerate(args))
    out = fn(*args)
    g = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
    out.backward(g)
    return [out.detach().float()] + [args[i].grad.float() for i in grad_idx]


def _adamw_steps(build: Callable, shapes: Shapes, device: torch.device, seed: int,
                 steps: int = 3) -> list[torch.Tensor]:
    """Parameters after a few AdamW steps on fixed gradients, one decayed group and one
    not (the optimizer's real grouping), fp32 as the optimizer keeps them."""
    gen = _generator(device, seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    w, b = rnd(shapes.hidden, shapes.ffn), rnd(shapes.ffn)
    grads = [(rnd(*w.shape), rnd(*b.shape)) for _ in range(steps)]
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
    args, grad_idx = _case(op, shapes, dtype, device, group, _generator(device, seed))
    got = _run(getattr(kernels, op), args, grad_idx, _generator(device, seed))
    want = _run(_TORCH[op], args, grad_idx, _generator(device, seed))
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
