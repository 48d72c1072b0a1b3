"""Train GPT-2 Medium (350M) for a few steps on one GPU and report tokens/s and MFU.

Why this exists: kernel speed-ups matter only if the whole training step gets faster;
model FLOPs utilisation (MFU) against the device's dense bf16 peak is the number that
says how much of the GPU a step uses. The model comes from ``configs/gpt2_medium.yaml``
(24 layers, hidden 1024, 16 heads, seq 1024, vocabulary 50257 padded to 50304), built
as the trainer builds it -- ``GPTModel`` with the dispatcher's kernels
(``kernels.backend=auto``: Triton on CUDA), the project's ``Optimizer`` (fp32 main
grads, clipping, fused AdamW) -- but fed random tokens, so no data set is needed.
bf16 autocast. The micro-batch starts at ``--micro-batch`` (8) and halves on
out-of-memory.

    python scripts/bench_mfu.py                      # one GPU, about a minute
    python scripts/bench_mfu.py --peak-tflops 989    # override the dense bf16 peak
    python scripts/bench_mfu.py --smoke              # tiny model on the CPU, 2 steps

FLOPs per token are ``megatron_paci.training.flops.flops_per_token`` (printed with the
result): matmuls only, forward + backward = 3x forward, causal attention counted as half.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_paci.config import load_config  # noqa: E402
from megatron_paci.config.schema import ModelConfig, OptimConfig  # noqa: E402
from megatron_paci.kernels.attention import attention_backend  # noqa: E402
from megatron_paci.kernels.dispatch import KernelError, Kernels, select_kernels  # noqa: E402
from megatron_paci.kernels.parity import Shapes, parity_check  # noqa: E402
from megatron_paci.model.gpt import GPTModel, count_parameters, padded_vocab_size  # noqa: E402
from megatron_paci.model.transformer import LayerContext, ffn_size  # noqa: E402
from megatron_paci.optim.optimizer import Optimizer  # noqa: E402
from megatron_paci.parallel.state import single_process  # noqa: E402
from megatron_paci.training.flops import (  # noqa: E402
    dense_bf16_peak_tflops,
    flops_per_token,
)

GPT2_VOCAB = 50257
TARGET_MFU = 0.45
FORMULA = ("FLOPs/token = 6·(L·(4h² + 2hf) + hV) + 6·L·s·h  "
           "(matmuls only; fwd+bwd = 3×fwd; causal attention counted as half of 12·L·s·h)")


def model_config(smoke: bool) -> ModelConfig:
    """GPT-2 Medium from the project's config file; a tiny GPT of the same shape for smoke."""
    cfg = load_config(str(ROOT / "configs" / "gpt2_medium.yaml")).model
    if smoke:
        cfg = dataclasses.replace(cfg, num_layers=2, hidden_size=64, num_attention_heads=4,
                                  seq_length=32)
    return cfg


def build(cfg: ModelConfig, vocab: int, device: torch.device, kernels: Kernels
          ) -> tuple[GPTModel, Optimizer]:
    model = GPTModel(cfg, vocab, seed=1234, tp=LayerContext(kernels=kernels)).to(device)
    return model, Optimizer(model, OptimConfig(), single_process(), kernels=kernels)


def train_step(model: torch.nn.Module, optimizer: Optimizer,
               batches: list[tuple[torch.Tensor, ...]], autocast: torch.dtype | None,
               lr: float = 1e-4) -> float:
    """One optimizer step over ``batches`` micro-batches, as the trainer's executor runs it."""
    optimizer.zero_grad()
    total = 0.0
    n = len(batches)
    for i, (tokens, labels) in enumerate(batches):
        sync = optimizer.no_sync() if i < n - 1 else contextlib.nullcontext()
        cast = (torch.autocast(tokens.device.type, dtype=autocast) if autocast
                else contextlib.nullcontext())
        with sync:
            with cast:
                loss = model(tokens, labels=labels).float().mean()
            (loss / n).backward()
        total += loss.detach()
    optimizer.step(lr)
    return float(total) / n


def random_batches(n: int, micro_batch: int, seq: int, vocab: int, device: torch.device,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 steps")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "apex"),
                   help="kernels.backend (auto: Triton on CUDA)")
    p.add_argument("--override", action="append", default=[], metavar="OP=BACKEND",
                   help="kernels.overrides entry, e.g. adamw=apex (repeatable)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="first micro-batch size tried; halved on out-of-memory")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per optimizer step (default 8; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; smoke 0)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; smoke 2)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak in TFLOP/s (default: from the device name)")
    p.add_argument("--compile", action="store_true",
                   help="run the model's forward through torch.compile (compile time is "
                        "spent in the warm-up steps, never timed)")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the start-up kernel parity check")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device, autocast = torch.device("cpu"), None
        accum, warmup, steps = 1, 0, 2
        micro_batch = min(args.micro_batch, 2)
    else:
        if not torch.cuda.is_available():
            print("bench_mfu: no CUDA device; use --smoke on a CPU", file=sys.stderr)
            return 2
        device, autocast = torch.device("cuda"), torch.bfloat16
        accum, warmup, steps = 8, 3, 5
        micro_batch = args.micro_batch
    accum = accum if args.micro_batches is None else args.micro_batches
    warmup = warmup if args.warmup is None else args.warmup
    if args.compile:
        warmup = max(warmup, 1)  # the first step compiles
    steps = steps if args.steps is None else args.steps
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (dense_bf16_peak_tflops(device_name) if device.type == "cuda"
                                else None)

    cfg = model_config(args.smoke)
    vocab = padded_vocab_size(GPT2_VOCAB if not args.smoke else 500,
                              cfg.make_vocab_size_divisible_by)
    try:
        kernels = select_kernels(args.backend, args.override, device)
    except KernelError as e:
        print(f"bench_mfu: {e}", file=sys.stderr)
        return 2
    fpt = flops_per_token(cfg, vocab)
    print(f"device: {device_name}")
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
          f"heads, ffn {ffn_size(cfg)}, seq {cfg.seq_length}, padded vocab {vocab}, "
          f"dropout {cfg.dropout}; precision {'bf16 autocast' if autocast else 'fp32'}"
          + ("; forward through torch.compile" if args.compile else ""))
    print(kernels.table())
    print(attention_backend(device, autocast or torch.float32, cfg.num_attention_heads,
                            cfg.hidden_size // cfg.num_attention_heads))

    while True:
        model = optimizer = batches = runner = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            model, optimizer = build(cfg, vocab, device, kernels)
            if not args.no_parity and any(c.backend != "torch" for c in kernels.choices.values()):
                # One sequence is enough to check the kernels; the real micro-batch would
                # only make the check's CPU-generated inputs slower to build.
                shapes = Shapes(seq=cfg.seq_length, batch=1, hidden=cfg.hidden_size,
                                ffn=ffn_size(cfg), heads=cfg.num_attention_heads,
                                head_dim=cfg.hidden_size // cfg.num_attention_heads,
                                vocab=vocab)
                report = parity_check(kernels, shapes, autocast or torch.float32, device)
                print("kernel parity check against the torch references passed:\n"
                      + "\n".join(report))
            batches = random_batches(accum, micro_batch, cfg.seq_length, vocab, device)
            runner = torch.compile(model) if args.compile else model
            for _ in range(warmup):
                train_step(runner, optimizer, batches, autocast)
            break
        except Exception as e:
            if not _is_oom(e) or micro_batch == 1:
                raise
            print(f"micro-batch {micro_batch}: out of memory; trying {micro_batch // 2}")
            micro_batch //= 2

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    losses = [train_step(runner, optimizer, batches, autocast) for _ in range(steps)]
    _sync(device)
    seconds = time.perf_counter() - t0

    tokens_per_step = accum * micro_batch * cfg.seq_length
    tokens_per_s = steps * tokens_per_step / seconds
    tflops = tokens_per_s * fpt / 1e12
    print(f"parameters: {count_parameters(model) / 1e6:.1f}M; micro-batch {micro_batch} x "
          f"{accum} micro-batches = {tokens_per_step} tokens per step; {warmup} warm-up, "
          f"{steps} timed steps; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"step time: {1e3 * seconds / steps:.1f} ms")
    print(f"tokens/s: {tokens_per_s:,.0f}")
    L, h, s = cfg.num_layers, cfg.hidden_size, cfg.seq_length
    print(f"formula: {FORMULA}; here L={L}, h={h}, f={ffn_size(cfg)}, V={vocab}, s={s}: "
          f"{fpt / 1e9:.3f} GFLOP/token")
    print(f"model TFLOP/s: {tflops:.1f}")
    if peak:
        mfu = tflops / peak
        verdict = ("smoke run, not a measurement" if args.smoke else
                   ("meets" if mfu >= TARGET_MFU else "misses")
                   + f" the {100 * TARGET_MFU:.0f}% target")
        print(f"MFU: {100 * mfu:.1f}% of {peak:.0f} TFLOP/s dense bf16 peak ({device_name}); "
              f"{verdict}")
    else:
        print(f"MFU: n/a (no dense bf16 peak known for {device_name}; pass --peak-tflops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
