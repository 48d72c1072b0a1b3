"""How long a checkpoint save blocks training: synchronous vs ``checkpoint.async_save``.

One process, a GPT of about 88M parameters (12 layers, hidden 768, vocabulary 4096)
with AdamW-shaped state (two moments), saved through ``save_checkpoint`` exactly
as the trainer does. Rounds alternate sync and async; the stall is the time the
call blocks, "async total" adds the wait for the background write (the next
save or the end of training pays whatever is left of it). Also times the CRC-32
the manifest records, on a 100 MB file. Prints a markdown table.

    python3 scripts/bench_ckpt_save.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_paci.checkpoint.format import save_checkpoint, wait_for_pending_save  # noqa: E402
from megatron_paci.checkpoint.integrity import file_digest  # noqa: E402
from megatron_paci.config.schema import ModelConfig  # noqa: E402
from megatron_paci.model.gpt import GPTModel  # noqa: E402


def crc_rate(directory: str, mb: int = 100) -> float:
    """MB/s of the manifest's streamed CRC-32 (median of 3, file in page cache)."""
    path = os.path.join(directory, "crc.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(mb << 20))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        file_digest(path)
        times.append(time.perf_counter() - t)
    os.remove(path)
    return mb / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="sync+async pairs (default 3)")
    p.add_argument("--layers", type=int, default=12, help="transformer layers (default 12)")
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default 768)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=max(1, args.hidden // 64), seq_length=128)
    model = GPTModel(cfg, vocab_size=4096)
    params = sum(t.numel() for t in model.state_dict().values())
    tensors = {"model": model.state_dict(),
               "optimizer": {f"{n}.{m}": torch.randn_like(t) for n, t in
                             model.state_dict().items() for m in ("exp_avg", "exp_avg_sq")}}
    nbytes = sum(t.numel() * t.element_size() for d in tensors.values() for t in d.values())
    work = args.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    os.makedirs(work, exist_ok=True)
    rows: dict[str, list[float]] = {"sync stall": [], "async stall": [], "async total": []}
    for r in range(args.rounds):
        for mode in ("sync", "async"):
            root = os.path.join(work, f"{mode}{r}")
            t = time.perf_counter()
            save_checkpoint(root, 1, tensors, {}, "", async_save=mode == "async")
            stall = time.perf_counter() - t
            wait_for_pending_save()
            total = time.perf_counter() - t
            rows[f"{mode} stall"].append(stall)
            if mode == "async":
                rows["async total"].append(total)
            print(f"round {r} {mode}: stall {stall:.2f} s, total {total:.2f} s", file=sys.stderr)
            shutil.rmtree(root)
    rate = crc_rate(work)
    if not args.dir:
        shutil.rmtree(work)
    print(f"model: {params / 1e6:.1f}M parameters, checkpoint {nbytes / 2**20:.0f} MiB "
          f"(weights + 2 Adam moments, fp32), {args.rounds} interleaved rounds\n")
    print("| | median s | runs (s) |\n|---|---|---|")
    for name, vals in rows.items():
        print(f"| {name} | {statistics.median(vals):.2f} | "
              + ", ".join(f"{v:.2f}" for v in vals) + " |")
    print(f"\nCRC-32 of a 100 MB file (page cache): {rate:.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
