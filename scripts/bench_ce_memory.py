"""Peak tensor memory of one cross-entropy forward + backward: fused Triton vs torch.

Why this exists: the fused cross-entropy is worth its code only if it holds far less
memory than the torch path at GPT vocabulary sizes (target: a quarter or less at
vocabulary 50257). On a GPU ``scripts/bench_kernels.py`` reads the allocator's peak.
This script counts instead: a ``TorchDispatchMode`` sees every tensor an op creates
and a weak reference on its storage sees it freed, so the peak of live storage bytes
is exact and independent of the device and its allocator (no caching, no
fragmentation, no alignment). It runs anywhere, the CPU included (Triton through its
interpreter, ``TRITON_INTERPRET=1``), which makes it a check of what each path
allocates, not of a particular GPU.

    TRITON_INTERPRET=1 python scripts/bench_ce_memory.py            # CPU, ~1 min
    python scripts/bench_ce_memory.py --device cuda                  # also reads torch.cuda

The logits are bf16 as under autocast, made by the caller (counted as input), and the
gradient is taken with respect to them, as the model's backward does.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_paci.kernels.dispatch import KernelError, select_kernels  # noqa: E402

TARGET_RATIO = 0.25


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of storage alive that were created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()
        self._external: set[int] = set()

    def exclude(self, *tensors: torch.Tensor) -> None:
        """Storage made before the mode (inputs): its views are not new memory."""
        self._external.update(t.untyped_storage()._cdata for t in tensors)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live or key in self._external:  # a view, or an op's own input
            return
        n = storage.nbytes()
        self._live.add(key)
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._freed, key, n)

    def _freed(self, key: int, n: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def measure(fn: Callable, tokens: int, vocab: int, device: torch.device,
            seed: int = 0) -> tuple[int, int, float]:
    """(input bytes, peak bytes created during forward + backward, loss) of ``fn``."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=gen) * 2).to(device, torch.bfloat16)
    logits.requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    inputs = logits.numel() * logits.element_size() + target.numel() * target.element_size()
    tracker = LiveTensorBytes()
    tracker.exclude(logits, target)
    with tracker:
        loss = fn(logits, target).mean()
        (grad,) = torch.autograd.grad(loss, logits)
        del grad
    return inputs, tracker.peak, loss.item()


def cuda_peak(fn: Callable, tokens: int, vocab: int, device: torch.device) -> int:
    """The caching allocator's peak over the same call, inputs included."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    measure(fn, tokens, vocab, device)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="rows of logits (default 64)")
    p.add_argument("--vocab", type=int, nargs="+", default=[50257, 50304],
                   help="vocabulary sizes (default: GPT-2's 50257 and padded 50304)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    try:
        fused = select_kernels("triton", [], device).cross_entropy
    except KernelError as e:
        print(f"bench_ce_memory: {e}", file=sys.stderr)
        return 2
    paths = {
        "triton (inplace_backward)": lambda x, t: fused(x, t, None, inplace_backward=True),
        "triton": lambda x, t: fused(x, t, None),
        "torch": select_kernels("torch", [], device).cross_entropy,
    }
    print(f"device {device}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}; "
          f"bf16 logits [{args.tokens}, V] made by the caller; torch {torch.__version__}")
    print("| vocab | path | input MiB | peak created MiB | peak total MiB | x torch "
          "| loss |" + (" cuda allocator peak MiB |" if device.type == "cuda" else ""))
    print("|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else ""))
    verdicts = []
    for vocab in args.vocab:
        rows = {name: measure(fn, args.tokens, vocab, device) for name, fn in paths.items()}
        base = sum(rows["torch"][:2])
        for name, (inputs, created, loss) in rows.items():
            total = inputs + created
            line = (f"| {vocab} | {name} | {inputs / 2**20:.2f} | {created / 2**20:.3f} | "
                    f"{total / 2**20:.2f} | {total / base:.3f} | {loss:.5f} |")
            if device.type == "cuda":
                line += f" {cuda_peak(paths[name], args.tokens, vocab, device) / 2**20:.2f} |"
            print(line)
        ratio = sum(rows["triton (inplace_backward)"][:2]) / base
        verdicts.append(f"vocab {vocab}: fused/torch peak {ratio:.3f} "
                        f"({'meets' if ratio <= TARGET_RATIO else 'misses'} the <= "
                        f"{TARGET_RATIO} target)")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
