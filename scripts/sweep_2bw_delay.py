"""Is PipeDream-2BW's loss gap to 1F1B-flush its one-step delay, or a defect? An LR sweep.

PipeDream-2BW's update rule (design.md) is W(k+1) = W(k) - lr * u(grad f_k(W(k-1))): every
stage takes window k's gradient at the weights one update old. If the gap to flush is that
delay, it must grow with the learning rate (each step is taken from a point one step away
from where its gradient was measured) and vanish as lr -> 0; a defect need not.

``delayed_update_losses`` is that rule in plain torch (the project's GPTModel only for
forward and backward; the weights the gradient is taken at, AdamW and the LR written here).
With delay 0 it is 1F1B-flush at P=2, with delay 1 PipeDream-2BW at P=2: both bit for bit
on gloo (tests/distributed/test_2bw_delay.py, test_pipeline_training.py). The sweep runs
both delays for each LR and seed on the same tiny GPT, real text and data order, and
reports the final validation loss. ``--check`` also trains the first LR and seed with the
real schedules (pretrain_gpt.py, 2 processes, gloo, fp32, untied, unclipped) and reports
how far their training losses are from delay 0 and delay 1.

    python3 scripts/sweep_2bw_delay.py --lrs 3e-4,1e-3,3e-3,1e-2 --seeds 1,2 --iters 100 --check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WINDOW = 8  # micro-batches per global batch (m)
MICRO_BATCH = 2
WARMUP = 5
EVAL_MICRO_BATCHES = 64  # validation micro-batches for the final loss


def delayed_update_losses(model: nn.Module, batches: Iterator[torch.Tensor], window: int,
                          windows: int, lr: Callable[[int], float], delay: int,
                          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                          weight_decay: float = 0.0) -> list[float]:
    """Window-mean losses of W(k+1) = W(k) - lr(k) * AdamW(grad f_k(W(max(0, k-delay)))),
    leaving ``model`` at the last weights.

    ``batches`` yields [b, s+1] token blocks; ``model(tokens=, labels=)`` returns the
    per-token loss. The gradient is the mean over the window's micro-batches, taken
    with the model's parameters set to the older weights; the update is applied to
    separate master tensors by ``torch.optim.AdamW`` (matrices decay, vectors not)."""
    params = dict(model.named_parameters())
    master = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    groups = [{"params": [p for p in master.values() if p.dim() >= 2],
               "weight_decay": weight_decay},
              {"params": [p for p in master.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr(0), betas=betas,
                            eps=eps)
    weights = [{n: p.detach().clone() for n, p in master.items()}]  # W(k-delay) .. W(k)
    out = []
    for k in range(windows):
        at = weights[max(0, len(weights) - 1 - delay)]
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(at[n])
                p.grad = None
        total = 0.0
        for _ in range(window):
            tokens = next(batches)
            loss = model(tokens=tokens[:, :-1], labels=tokens[:, 1:]).mean()
            (loss / window).backward()
            total += loss.item()
        out.append(total / window)
        for n, p in master.items():
            p.grad = params[n].grad.detach().clone()
        for g in opt.param_groups:
            g["lr"] = lr(k)
        opt.step()
        weights = (weights + [{n: p.detach().clone() for n, p in master.items()}])[-delay - 1:]
    with torch.no_grad():  # leave the model at the last weights, W(windows)
        for n, p in params.items():
            p.copy_(master[n])
            p.grad = None
    return out


def warmup_cosine(peak: float, floor: float, warmup: int, total: int) -> Callable[[int], float]:
    """LR of the update after k updates: linear warm-up over ``warmup``, cosine to ``floor``."""
    def lr(k: int) -> float:
        if k < warmup:
            return peak * (k + 1) / warmup
        t = min(1.0, (k - warmup) / max(1, total - warmup))
        return floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2

    return lr


def build_data(directory: Path) -> tuple[str, str]:
    """A small real-text corpus (Python's docstrings) through the data_prep CLIs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    steps = [
        ["-m", "data_prep.build_corpus", "--output", str(directory), "--sources", "pydoc",
         "--max-mb", "0.4"],
        ["-m", "data_prep.train_tokenizer", "--input", str(directory / "corpus.jsonl"),
         "--vocab-size", "512", "--output", str(directory / "tok")],
        ["-m", "data_prep.preprocess", "--input", str(directory / "corpus.jsonl"),
         "--tokenizer", str(directory / "tok.model"), "--output-prefix",
         str(directory / "text_document"), "--append-eod", "--workers", "1"],
    ]
    for args in steps:
        subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True,
                       capture_output=True)
    return str(directory / "text_document"), str(directory / "tok.model")


def overrides(data: str, tokenizer: str, run_dir: Path, schedule: str, lr: float, seed: int,
              iters: int) -> dict[str, str]:
    return {
        "model.num_layers": "4", "model.hidden_size": "64", "model.num_attention_heads": "4",
        "model.seq_length": "32", "model.dropout": "0.0", "model.attention_dropout": "0.0",
        "model.tie_embeddings": "false", "data.path": f"[{data}]", "data.tokenizer": tokenizer,
        "train.micro_batch_size": str(MICRO_BATCH),
        "train.global_batch_size": str(MICRO_BATCH * WINDOW), "train.iters": str(iters),
        "train.eval_interval": str(iters), "train.eval_iters": "8", "train.seed": str(seed),
        "train.precision": "fp32", "train.device": "cpu", "optim.lr": str(lr),
        "optim.min_lr": str(lr / 10), "optim.lr_warmup_iters": str(WARMUP),
        "optim.lr_decay_style": "cosine", "optim.clip_grad": "0.0",
        "parallel.pipeline": "2", "pipeline.schedule": schedule, "logging.interval": "1",
        "logging.plot": "false", "checkpoint.save_at_end": "false",
        "checkpoint.interval": "0", "run.dir": str(run_dir),
    }


def train(over: dict[str, str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "pretrain_gpt.py", *[f"{k}={v}" for k, v in over.items()]]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{r.stdout[-2000:]}"
                           f"{r.stderr[-2000:]}")
    with open(Path(over["run.dir"]) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def setup(over: dict[str, str]):
    """The run's config, dataset and vocabulary, as pretrain_gpt.py builds them at P=1."""
    from megatron_paci.config import load_config
    from megatron_paci.training.trainer import Trainer

    one = dict(over, **{"parallel.pipeline": "1", "pipeline.schedule": "1f1b_flush"})
    cfg = load_config(None, [f"{k}={v}" for k, v in one.items()])
    return cfg, Trainer(cfg)


def one_process(over: dict[str, str], iters: int, delay: int) -> tuple[list[float], float]:
    """(training losses, final validation loss) of the plain-torch rule with ``delay``."""
    from megatron_paci.data.sampler import build_pretraining_data_loader
    from megatron_paci.model.gpt import GPTModel

    cfg, ref = setup(over)
    model = GPTModel(cfg.model, ref.vocab_size, seed=cfg.train.seed)
    loader = build_pretraining_data_loader(ref.train_ds, 0, MICRO_BATCH, 0, 1)
    o = cfg.optim
    lr = warmup_cosine(o.lr, o.min_lr, o.lr_warmup_iters, iters)
    losses = delayed_update_losses(model, (b["tokens"] for b in loader), WINDOW, iters, lr,
                                   delay, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                   weight_decay=o.weight_decay)
    val = build_pretraining_data_loader(ref.valid_ds, 0, MICRO_BATCH, 0, 1)
    total, n = 0.0, 0
    with torch.no_grad():
        for b, _ in zip(val, range(EVAL_MICRO_BATCHES), strict=False):
            t = b["tokens"]
            total += float(model(tokens=t[:, :-1], labels=t[:, 1:]).mean())
            n += 1
    return losses, total / n


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--check", action="store_true",
                    help="also train the first LR and seed with the real schedules")
    ap.add_argument("--data", help="data prefix (default: build a small pydoc corpus)")
    ap.add_argument("--tokenizer", help="tokenizer path for --data")
    ap.add_argument("--output", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    start = time.time()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="sweep_2bw_") as tmp:
        tmp = Path(tmp)
        if args.data:
            data, tok = args.data, args.tokenizer
        else:
            data, tok = build_data(tmp / "data")
        for lr in lrs:
            for seed in seeds:
                over = overrides(data, tok, tmp / f"ref_{lr}_{seed}", "1f1b_flush", lr, seed,
                                 args.iters)
                (train0, val0), (train1, val1) = (one_process(over, args.iters, d)
                                                  for d in (0, 1))
                rows.append((lr, seed, val0, val1))
                print(f"lr {lr:g} seed {seed}: delay 0 (flush) {val0:.4f}  delay 1 (2BW) "
                      f"{val1:.4f}", flush=True)
                if args.check and not notes:
                    for schedule, want in (("1f1b_flush", train0), ("pipedream_2bw", train1)):
                        run = overrides(data, tok, tmp / f"{schedule}_{lr}_{seed}", schedule,
                                        lr, seed, args.iters)
                        got = [r["loss"] for r in train(run) if "loss" in r]
                        notes.append(f"{schedule} at P=2 (pretrain_gpt.py, lr {lr:g}, seed "
                                     f"{seed}): training losses within {_rel(got, want):.1e} "
                                     f"relative of delay {0 if schedule == '1f1b_flush' else 1}")
                        print(notes[-1], flush=True)
    lines = ["| lr | flush (delay 0) val loss | 2BW (delay 1) val loss | gap (mean) |"
             " gap per seed |", "|---|---|---|---|---|"]
    for lr in lrs:
        mine = [r for r in rows if r[0] == lr]
        flush = sum(r[2] for r in mine) / len(mine)
        two = sum(r[3] for r in mine) / len(mine)
        per_seed = ", ".join(f"{100 * (r[3] - r[2]) / r[2]:+.1f}%" for r in mine)
        lines.append(f"| {lr:g} | {flush:.4f} | {two:.4f} | {100 * (two - flush) / flush:+.1f}% "
                     f"| {per_seed} |")
    table = "\n".join(lines + [""] + notes)
    print(table)
    print(f"{len(rows) * 2} one-process runs{' and 2 real runs' if notes else ''} in "
          f"{time.time() - start:.0f} s")
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
