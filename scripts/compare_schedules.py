"""The honest comparison: does PACI match 1F1B-flush's loss, and beat its time-to-accuracy?

Why this exists: the schedules' default runs are not like for like (flush trains a tied
model with global clipping, the asynchronous schedules an untied one with per-stage
clipping), and one seed decides nothing. Here every schedule trains the same untied
model with the same clipping policy (none by default, as the PACI reference), on the
same data and seeds, at P=2 on real processes (torchrun, gloo, fp32, one thread each).
Runs are interleaved, every schedule once per seed before the next seed, so the load of
this shared machine hits all of them alike; the load is recorded per run.

PACI's window a is the number of micro-batches per step, M = global_batch /
(micro_batch x dp): a PACI run with a < M has a smaller global batch. Every run sees the
same number of tokens, so a run with window a has M/a times the iterations, and its LR
warm-up, decay and evaluation interval are scaled by M/a too: the LR, the evaluations and
the data order are the same at every token count; only the tokens per step differ.
Evaluation always reads the same 16 validation micro-batches.

Part two projects P=8, which this machine cannot run: the one-process emulator
(megatron_paci/pipeline/emulator.py) gives the loss per token of flush and PACI at
a = 1, 2, 4, 8 on 8 stages; the simulator, fed the per-action costs measured at P=2,
gives the throughput; together a projected time-to-accuracy.

    bash scripts/compare_schedules.sh --output docs/results/compare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_schedules import cpu_seconds, fit_p2p, table, window_time  # noqa: E402

from megatron_paci.pipeline.registry import get_schedule  # noqa: E402
from megatron_paci.pipeline.schedules import FLUSH, PACI, PIPEDREAM_2BW  # noqa: E402
from megatron_paci.pipeline.simulate import Costs  # noqa: E402

P = 2
EVAL_MICRO_BATCHES = 16  # validation micro-batches per evaluation, whatever the window
DIFF_RULE = ("a difference is called one only when the min..max ranges over seeds do not "
             "overlap")


@dataclass(frozen=True)
class Variant:
    """One schedule setting: its label, schedule, window (micro-batches per step) and
    model chunks per rank."""

    label: str
    schedule: str
    window: int
    chunks: int = 1


def variants(window: int, paci_windows: Sequence[int], quick: bool = False) -> list[Variant]:
    """Flush (the baseline, first), interleaved flush, 2BW and PACI at its default window
    (= flush's) and at each of ``paci_windows``."""
    flush = Variant(FLUSH.title, FLUSH.name, window)
    paci = Variant(f"{PACI.title} a={window}", PACI.name, window)
    if quick:
        return [flush, paci]
    out = [flush, Variant(f"interleaved {FLUSH.title} (v=2)", FLUSH.name, window, 2),
           Variant(PIPEDREAM_2BW.title, PIPEDREAM_2BW.name, window), paci]
    out += [Variant(f"{PACI.title} a={a}", PACI.name, a) for a in paci_windows if a != window]
    return out


@dataclass
class RunResult:
    """What one run measured; ``evals`` are (tokens, elapsed_s, val_loss) in order."""

    label: str
    seed: int
    evals: list[tuple[float, float, float]]
    tokens_per_s: float
    peak_rss_mb: list[float]
    max_drift: list[int]
    action_ms: dict[str, list[float]] = field(default_factory=dict)
    ms_per_iter: float = 0.0
    window: int = 0
    other_cores: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.evals[-1][2]


# --------------------------------------------------------------------------------------
# Reading metrics.jsonl
# --------------------------------------------------------------------------------------
def parse_metrics(rows: Sequence[dict], label: str, seed: int, warmup: int = 2) -> RunResult:
    """A run's result from its metrics rows: each validation loss placed at the tokens and
    elapsed time of the training row of the same iteration; tokens/s the median of the
    training rows after ``warmup``; memory and drift the maxima over the drains."""
    train = {r["iteration"]: r for r in rows if "tokens_per_s" in r}
    evals = [(float(train[r["iteration"]]["tokens"]), float(train[r["iteration"]]["elapsed_s"]),
              float(r["val_loss"])) for r in rows if "val_loss" in r]
    if not evals:
        raise ValueError(f"{label} seed {seed}: no val_loss rows in metrics.jsonl")
    drains = [r for r in rows if "peak_rss_mb" in r]
    late = [r for i, r in sorted(train.items()) if i > warmup] or list(train.values())
    return RunResult(
        label, seed, evals,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in late),
        peak_rss_mb=[max(v) for v in zip(*(r["peak_rss_mb"] for r in drains), strict=True)],
        max_drift=[max(v) for v in zip(*(r.get("max_drift", [0]) for r in drains),
                                       strict=True)],
        action_ms=drains[-1].get("action_ms", {}) if drains else {},
        ms_per_iter=statistics.median(r["ms_per_iter"] for r in late),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# The comparison's rules (pure; tests/unit/test_compare_schedules.py)
# --------------------------------------------------------------------------------------
def spread(xs: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sample std (0 for one value), min, max)."""
    xs = list(xs)
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0,
            min(xs), max(xs))


def differs(a: Sequence[float], b: Sequence[float]) -> bool:
    """The min..max ranges over seeds do not overlap (DIFF_RULE)."""
    return max(a) < min(b) or max(b) < min(a)


def mean_curve(runs: Sequence[RunResult]) -> tuple[list[float], list[float], list[float]]:
    """(tokens, mean elapsed s, mean val loss) at each evaluation, over the seeds; the
    seeds must have evaluated at the same token counts."""
    tokens = [e[0] for e in runs[0].evals]
    for r in runs:
        if [e[0] for e in r.evals] != tokens:
            raise ValueError(f"{r.label} seed {r.seed}: evaluated at other token counts "
                             f"than seed {runs[0].seed}")
    cols = list(zip(*(r.evals for r in runs), strict=True))
    return (tokens, [statistics.fmean(e[1] for e in c) for c in cols],
            [statistics.fmean(e[2] for e in c) for c in cols])


def crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The first x at which y falls to ``target``, linear between evaluations (from the
    first one: nothing is assumed before it); None when it never does."""
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return xs[0]
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (xs[i] - x0) * (y0 - target) / (y0 - y)
    return None


@dataclass
class Row:
    """One schedule's line of the table."""

    label: str
    tokens_per_s: tuple[float, float, float, float]
    final: tuple[float, float, float, float]
    tokens_to_target: float | None
    seconds_to_target: float | None
    peak_rss_mb: list[float]
    max_drift: list[int]
    other_cores: float
    loss_differs: bool
    speed_differs: bool


def summarise(results: Sequence[RunResult], order: Sequence[str]) -> tuple[float, list[Row]]:
    """The target (flush's mean final validation loss; ``order[0]`` is flush) and one row
    per label: time to target on the mean curve, in tokens and in seconds; differences
    against flush by DIFF_RULE."""
    by = {lab: [r for r in results if r.label == lab] for lab in order}
    target = statistics.fmean(r.final_loss for r in by[order[0]])
    base = by[order[0]]
    rows = []
    for lab in order:
        runs = by[lab]
        tokens, secs, loss = mean_curve(runs)
        rows.append(Row(
            lab, spread([r.tokens_per_s for r in runs]), spread([r.final_loss for r in runs]),
            crossing(tokens, loss, target), crossing(secs, loss, target),
            [max(v) for v in zip(*(r.peak_rss_mb for r in runs), strict=True)],
            [max(v) for v in zip(*(r.max_drift for r in runs), strict=True)],
            statistics.fmean(r.other_cores for r in runs),
            differs([r.final_loss for r in runs], [r.final_loss for r in base]),
            differs([r.tokens_per_s for r in runs], [r.tokens_per_s for r in base]),
        ))  # fmt: skip
    return target, rows


def _ratio(base: float | None, mine: float | None) -> str:
    return f"{base / mine:.2f}x" if base is not None and mine else "-"


def results_table(target: float, rows: Sequence[Row]) -> str:
    """The markdown table; speed-ups are flush's time to target over the schedule's."""
    base = rows[0]
    body = []
    for r in rows:
        t, f = r.tokens_per_s, r.final
        loss_note = "" if r is base else (" (differs)" if r.loss_differs else " (same)")
        speed_note = "" if r is base else (" (differs)" if r.speed_differs else " (same)")
        body.append([
            r.label,
            f"{t[0]:.0f} ± {t[1]:.0f}{speed_note}",
            f"{f[0]:.3f} ± {f[1]:.3f} [{f[2]:.3f}..{f[3]:.3f}]{loss_note}",
            "not reached" if r.tokens_to_target is None else f"{r.tokens_to_target:,.0f}",
            _ratio(base.tokens_to_target, r.tokens_to_target),
            "not reached" if r.seconds_to_target is None else f"{r.seconds_to_target:.1f}",
            _ratio(base.seconds_to_target, r.seconds_to_target),
            " / ".join(f"{m:.0f}" for m in r.peak_rss_mb),
            " / ".join(str(d) for d in r.max_drift),
            f"{r.other_cores:.2f}",
        ])  # fmt: skip
    head = ["schedule", "tokens/s mean ± std", "final val loss mean ± std [min..max]",
            f"tokens to {target:.3f}", "speed-up (tokens)", f"seconds to {target:.3f}",
            "speed-up (time)", "peak RSS MB s0 / s1", "max drift s0 / s1",
            "other load (cores)"]
    return table(head, body)


# --------------------------------------------------------------------------------------
# Data and runs
# --------------------------------------------------------------------------------------
def build_data(directory: Path, max_mb: float) -> tuple[str, str]:
    """Python's docstrings through the data_prep CLIs (a 512-token BPE)."""
    prefix, tok = directory / "text_document", directory / "tok.model"
    if prefix.with_suffix(".idx").exists() and tok.exists():
        return str(prefix), str(tok)
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    steps = [
        ["data_prep.build_corpus", "--output", str(directory), "--sources", "pydoc",
         "--max-mb", str(max_mb)],
        ["data_prep.train_tokenizer", "--input", str(directory / "corpus.jsonl"),
         "--vocab-size", "512", "--output", str(directory / "tok")],
        ["data_prep.preprocess", "--input", str(directory / "corpus.jsonl"), "--tokenizer",
         str(tok), "--output-prefix", str(prefix), "--append-eod", "--workers", "1"],
    ]
    for cmd in steps:
        subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, check=True,
                       capture_output=True)
    return str(prefix), str(tok)


def model_overrides(args: argparse.Namespace, num_layers: int) -> dict[str, str]:
    """The model and optimizer every schedule shares (P=2 runs and the P=8 emulation)."""
    return {
        "model.num_layers": str(num_layers), "model.hidden_size": str(args.hidden),
        "model.num_attention_heads": "4", "model.seq_length": str(args.seq_length),
        "model.dropout": "0.0", "model.attention_dropout": "0.0",
        "model.tie_embeddings": "false", "optim.clip_grad": str(args.clip_grad),
        "optim.lr": str(args.lr), "optim.min_lr": str(args.lr / 10),
        "optim.lr_decay_style": "cosine", "train.precision": "fp32", "train.device": "cpu",
        "data.split": "95,5,0",
    }


def run_overrides(args: argparse.Namespace, v: Variant, seed: int, data: tuple[str, str],
                  run_dir: Path) -> dict[str, str]:
    """A run with window a = v.window: iterations, warm-up and the evaluation interval
    scaled by M/a, so the tokens, LR and evaluations line up with flush's."""
    if args.window % v.window:
        raise ValueError(f"window {v.window} does not divide --window {args.window}")
    k = args.window // v.window
    over = model_overrides(args, args.num_layers)
    over.update({
        "data.path": f"[{data[0]}]", "data.tokenizer": data[1],
        "data.cache_dir": str(run_dir.parent / "index_cache"),
        "train.micro_batch_size": str(args.micro_batch_size),
        "train.global_batch_size": str(v.window * args.micro_batch_size),
        "train.iters": str(args.iters * k), "train.eval_interval": str(args.eval_interval * k),
        "train.eval_iters": str(EVAL_MICRO_BATCHES // v.window), "train.seed": str(seed),
        "train.sample_tokens": "0", "optim.lr_warmup_iters": str(args.warmup * k),
        "parallel.pipeline": str(P), "parallel.virtual_pipeline": str(v.chunks),
        "pipeline.schedule": v.schedule, "pipeline.layers_per_stage": "auto",
        "kernels.parity_check": "false", "logging.interval": "1", "logging.plot": "false",
        "checkpoint.interval": "0", "checkpoint.save_at_end": "false", "run.dir": str(run_dir),
    })  # fmt: skip
    return over


def train_run(args: argparse.Namespace, v: Variant, seed: int, data: tuple[str, str],
              work: Path) -> RunResult:
    """One P=2 run through torchrun, as bench_schedules.py launches them."""
    run_dir = work / f"{v.schedule}_a{v.window}_v{v.chunks}_seed{seed}"
    over = run_overrides(args, v, seed, data, run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(P), "pretrain_gpt.py", "--config", "configs/tiny.yaml",
           *[f"{k}={x}" for k, x in over.items()]]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    run_dir.mkdir(parents=True)
    (busy0, kids0), t0 = cpu_seconds(), time.perf_counter()
    with open(run_dir / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    (busy1, kids1), wall = cpu_seconds(), time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (run_dir / "stdout.log").read_text().splitlines()[-30:]
        raise RuntimeError(f"{v.label} seed {seed} failed (rc {proc.returncode}):\n"
                           + "\n".join(tail))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    r = parse_metrics(rows, v.label, seed)
    r.window = v.window
    r.other_cores = max(0.0, (busy1 - busy0) - (kids1 - kids0)) / wall
    return r


# --------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------
def draw(results: Sequence[RunResult], order: Sequence[str], path: str, title: str) -> None:
    """Validation loss against tokens and against wall-clock seconds (x: the seeds' mean
    elapsed time at each evaluation), mean and min..max band over seeds."""
    from megatron_paci.utils.figures import SeedRuns, save_figure, seed_band_figure

    by_tokens, by_time = [], []
    for lab in order:
        runs = [r for r in results if r.label == lab]
        tokens, secs, _ = mean_curve(runs)
        ys = [[e[2] for e in r.evals] for r in runs]
        by_tokens.append(SeedRuns(lab, tokens, ys))
        by_time.append(SeedRuns(lab, secs, ys))
    fig = seed_band_figure([("tokens", by_tokens), ("wall-clock seconds (mean over seeds)",
                                                    by_time)], title=title)
    save_figure(fig, path)


# --------------------------------------------------------------------------------------
# P=8: the emulator's loss per token, the simulator's throughput
# --------------------------------------------------------------------------------------
def block_means(window_losses: Sequence[float], window: int, block: int) -> list[float]:
    """Mean loss per block of ``block`` micro-batches from per-window means of ``window``
    micro-batches each (``window`` divides ``block``; a trailing part block is dropped)."""
    if block % window:
        raise ValueError(f"block of {block} micro-batches is not a multiple of window {window}")
    k = block // window
    return [statistics.fmean(window_losses[i:i + k])
            for i in range(0, len(window_losses) - k + 1, k)]


@dataclass
class Emulated:
    """One P=8 emulated run: training loss per block of micro-batches (each micro-batch
    seen once, so this is a loss on unseen tokens) and the final validation loss."""

    label: str
    seed: int
    window: int
    blocks: list[float]
    final_val: float


def emulate_p8(args: argparse.Namespace, data: tuple[str, str], windows: Sequence[int],
               seeds: Sequence[int], stages: int = 8) -> list[Emulated]:
    """Flush at window ``args.window8`` and PACI at each window in ``windows``, emulated on
    ``stages`` one-layer stages (the first also holds the embedding, the last the head).
    Every run reads the same micro-batches in the same order; PACI with window a takes
    M/a times the steps, its LR warm-up and decay scaled alike (same LR per token)."""
    import torch

    from megatron_paci.config.loader import load_config
    from megatron_paci.data.gpt_dataset import build_gpt_datasets
    from megatron_paci.data.sampler import build_pretraining_data_loader
    from megatron_paci.data.tokenizer import build_tokenizer
    from megatron_paci.model.gpt import GPTModel, StageSpec
    from megatron_paci.model.vocab import resolve_vocab_size
    from megatron_paci.pipeline.emulator import emulate

    torch.set_num_threads(1)
    m, mbs = args.window8, args.p8_micro_batch_size
    over = model_overrides(args, stages)
    over.update({"data.path": f"[{data[0]}]", "data.tokenizer": data[1],
                 "train.micro_batch_size": str(mbs)})
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), [f"{k}={x}" for k, x in over.items()])
    vocab = resolve_vocab_size(cfg, build_tokenizer(data[1]).vocab_size, 1)
    total_mb = m * args.p8_windows
    runs = [(FLUSH.title, FLUSH.name, m)] + [(f"{PACI.title} a={a}", PACI.name, a)
                                               for a in windows]
    out = []
    for seed in seeds:
        train_ds, valid_ds, _ = build_gpt_datasets(
            cfg.data.path, cfg.data.split, cfg.model.seq_length, seed,
            (total_mb * mbs, EVAL_MICRO_BATCHES * mbs, 0), args.index_cache)
        valid = list(build_pretraining_data_loader(valid_ds, 0, mbs, 0, 1))
        valid = valid[:EVAL_MICRO_BATCHES]
        for label, schedule, a in runs:
            t0 = time.perf_counter()
            models = [GPTModel(cfg.model, vocab, stage=StageSpec(s, s + 1, s == 0,
                                                                 s == stages - 1), seed=seed)
                      for s in range(stages)]
            k = m // a
            ocfg = dataclasses.replace(cfg.optim, lr_warmup_iters=args.warmup * k)
            batches = iter(build_pretraining_data_loader(train_ds, 0, mbs, 0, 1))
            losses = emulate(schedule, models, batches, a, args.p8_windows * k, ocfg,
                             args.p8_windows * k)
            e = Emulated(label, seed, a, block_means(losses, a, m * args.p8_block),
                         val_loss(models, valid))
            out.append(e)
            print(f"P={stages} emulated {label:10s} seed {seed}: final val loss "
                  f"{e.final_val:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def val_loss(models, valid) -> float:
    """Mean loss of the stage models (at their current weights) over ``valid``."""
    import torch

    total = 0.0
    with torch.no_grad():
        for b in valid:
            tokens = b["tokens"]
            x = None
            for s, model in enumerate(models):
                x = model(tokens=tokens[:, :-1] if s == 0 else None, hidden=x,
                          labels=tokens[:, 1:] if s == len(models) - 1 else None)
            total += float(x.mean())
    return total / len(valid)


def measured_costs(results: Sequence[RunResult], chunk_labels: set[str],
                   local_labels: set[str]) -> list[Costs]:
    """Mean per-action ms per stage over the one-chunk P=2 runs; STEP from the locally
    stepping schedules only (a flush STEP waits inside the global all-reduce)."""
    one = [r for r in results if r.label not in chunk_labels and r.action_ms]
    out = []
    for s in range(P):
        f = statistics.fmean(r.action_ms["F"][s] for r in one)
        b = statistics.fmean(r.action_ms["B"][s] for r in one)
        st = statistics.fmean(r.action_ms["S"][s] for r in one if r.label in local_labels)
        out.append(Costs(f, b, st))
    return out


def projected_speedups(costs: Costs, stages: int, flush_window: int,
                       paci_windows: Sequence[int]) -> dict[int, float]:
    """Simulated steady-state throughput (micro-batches per time) of PACI at each window
    over flush's at ``flush_window``, every stage costing ``costs``."""
    cs = [costs] * stages
    flush = flush_window / window_time(FLUSH.name, stages, flush_window, cs)
    return {a: (a / window_time(PACI.name, stages, a, cs)) / flush for a in paci_windows}


def p8_section(emulated: Sequence[Emulated], costs: Costs, m: int, block_tokens: int,
               windows: Sequence[int]) -> tuple[str, float, dict]:
    """Loss per token (emulated) and throughput (simulated) into a projected
    time-to-accuracy against flush; the target is flush's mean final block loss."""
    labels = [FLUSH.title] + [f"{PACI.title} a={a}" for a in windows]
    by = {lab: [e for e in emulated if e.label == lab] for lab in labels}
    curves = {lab: [statistics.fmean(c) for c in zip(*(e.blocks for e in runs), strict=True)]
              for lab, runs in by.items()}
    xs = [block_tokens * (i + 1) for i in range(len(curves[FLUSH.title]))]
    target = curves[FLUSH.title][-1]
    speed = projected_speedups(costs, 8, m, windows)
    base_tok = crossing(xs, curves[FLUSH.title], target)
    rows, out = [], {}
    for lab in labels:
        vals = [e.final_val for e in by[lab]]
        last = [e.blocks[-1] for e in by[lab]]
        mean, std, lo, hi = spread(vals)
        tok = crossing(xs, curves[lab], target)
        a = by[lab][0].window
        thr = 1.0 if lab == FLUSH.title else speed[a]
        tta = None if tok is None else (base_tok / tok) * thr
        out[lab] = (tok, thr, tta)
        note = "" if lab == FLUSH.title else (
            " (differs)" if differs(vals, [e.final_val for e in by[FLUSH.title]]) else " (same)")
        rows.append([lab, str(a), f"{statistics.fmean(last):.3f} ± {spread(last)[1]:.3f}",
                     f"{mean:.3f} ± {std:.3f} [{lo:.3f}..{hi:.3f}]{note}",
                     "not reached" if tok is None else f"{tok:,.0f}", f"{thr:.2f}x",
                     "-" if tta is None else f"{tta:.2f}x"])
    head = ["schedule (P=8)", "window", "last-block loss mean ± std",
            "final val loss mean ± std [min..max]", f"tokens to {target:.3f}",
            "throughput vs flush (simulated)", "time-to-accuracy vs flush (projected)"]
    return table(head, rows), target, out


def throughput_table(costs: Costs, windows: Sequence[int]) -> str:
    """Simulated PACI/flush steady-state throughput at P=8, PACI at flush's window."""
    rows = []
    for m in windows:
        cs = [costs] * 8
        ratio = projected_speedups(costs, 8, m, [m])[m]
        bubble = 1 - m * (costs.forward + costs.backward) / window_time(FLUSH.name, 8, m, cs)
        rows.append([str(m), f"{(m + 7) / m:.2f}", f"{bubble:.2f}", f"{ratio:.2f}x"])
    return table(["M = a", "ideal (M+P-1)/M", "flush bubble (simulated)",
                  "PACI/flush throughput (simulated)"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--iters", type=int, default=100, help="iterations at the flush window")
    p.add_argument("--eval-interval", type=int, default=10, help="at the flush window")
    p.add_argument("--warmup", type=int, default=10, help="LR warm-up at the flush window")
    p.add_argument("--window", type=int, default=4, help="micro-batches per flush step (M)")
    p.add_argument("--paci-windows", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip-grad", type=float, default=0.0,
                   help="the one clipping policy of every schedule (0: none)")
    p.add_argument("--data-mb", type=float, default=1.0)
    p.add_argument("--data-dir", help="reuse/build the corpus here (default: a temp dir)")
    p.add_argument("--window8", type=int, default=8, help="flush window of the P=8 part")
    p.add_argument("--p8-paci-windows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--p8-windows", type=int, default=48, help="flush windows emulated at P=8")
    p.add_argument("--p8-block", type=int, default=4, help="flush windows per loss point")
    p.add_argument("--p8-micro-batch-size", type=int, default=4)
    p.add_argument("--skip-p8", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, flush and PACI, a few iterations: the plumbing only")
    p.add_argument("--output", help="folder for compare.md and compare.png")
    p.add_argument("--keep-runs", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.iters, args.eval_interval, args.warmup = [1, 2], 8, 4, 2
        args.p8_paci_windows, args.p8_windows, args.p8_block = [args.window8], 4, 2
    t0, load0, stamp = time.time(), os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC",
                                                                         time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="compare_schedules_"))
    args.index_cache = str(work / "index_cache")
    out_dir = Path(args.output) if args.output else work
    out_dir.mkdir(parents=True, exist_ok=True)
    vs = variants(args.window, args.paci_windows, args.quick)
    order = [v.label for v in vs]
    try:
        data = build_data(Path(args.data_dir) if args.data_dir else work / "data", args.data_mb)
        results = []
        for seed in args.seeds:  # round-robin: every schedule once per seed
            for v in vs:
                r = train_run(args, v, seed, data, work)
                print(f"seed {seed} {v.label:28s} final val loss {r.final_loss:.4f}, "
                      f"{r.tokens_per_s:7.0f} tokens/s, other load {r.other_cores:.2f} cores",
                      flush=True)
                results.append(r)
        t_p2 = time.time() - t0
        target, rows = summarise(results, order)
        draw(results, order, str(out_dir / "compare.png"),
             f"P={P}, {len(args.seeds)} seeds: validation loss (mean, min..max band)")
        chunked = {v.label for v in vs if v.chunks > 1}
        local = {v.label for v in vs if not get_schedule(v.schedule).global_step}
        per_stage = measured_costs(results, chunked, local)
        paci_ms = statistics.median(r.ms_per_iter for r in results
                                    if r.label == f"{PACI.title} a={args.window}")
        p2p = fit_p2p(per_stage, args.window, paci_ms)
        uni = Costs(statistics.fmean(c.forward for c in per_stage),
                    statistics.fmean(c.backward for c in per_stage),
                    statistics.fmean(c.step for c in per_stage), p2p)
        p8 = ""
        if not args.skip_p8:
            emulated = emulate_p8(args, data, args.p8_paci_windows, args.seeds)
            block_tokens = args.window8 * args.p8_block * args.p8_micro_batch_size * \
                args.seq_length
            p8_table, p8_target, _ = p8_section(emulated, uni, args.window8, block_tokens,
                                                args.p8_paci_windows)
            p8 = "\n".join([
                "### P=8 (projection: emulated loss, simulated throughput)\n",
                f"Emulated: {len(args.seeds)} seeds, 8 stages of one layer (hidden "
                f"{args.hidden}, sequence {args.seq_length}, micro-batch "
                f"{args.p8_micro_batch_size}), {args.p8_windows * args.window8} micro-batches "
                f"({args.p8_windows * args.window8 * args.p8_micro_batch_size * args.seq_length:,}"
                f" tokens) per run, the same micro-batches in the same order for every run. "
                f"Flush window {args.window8}. Loss per block of {block_tokens:,} tokens is the "
                f"training loss on those (unseen) tokens; target {p8_target:.3f} = flush's mean "
                "last-block loss. Throughput: the simulator with every one of 8 stages costing "
                f"the measured mean P=2 stage (F {uni.forward:.1f} ms, B {uni.backward:.1f} ms, "
                f"local STEP {uni.step:.1f} ms, fitted p2p {p2p:.2f} ms). Projected "
                "time-to-accuracy vs flush = (flush tokens to target / tokens to target) x "
                "throughput ratio.",
                "", p8_table, "",
                "Simulated throughput alone (same costs), PACI at flush's window:", "",
                throughput_table(uni, [args.window8, 2 * args.window8]), ""])
        t_all = time.time() - t0
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"run directories kept in {work}")
    tokens = args.iters * args.window * args.micro_batch_size * args.seq_length
    report = "\n".join([
        f"### P={P}, measured\n",
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), run round-robin over "
        f"the schedules within each seed. Model: {args.num_layers} layers, hidden "
        f"{args.hidden}, 4 heads, sequence {args.seq_length}, untied embeddings, clip_grad "
        f"{args.clip_grad:g} for every schedule, fp32, layers_per_stage=auto. Micro-batch "
        f"{args.micro_batch_size}; flush window M={args.window}; {tokens:,} training tokens "
        f"per run ({args.iters} iterations at M={args.window}, M/a times as many at PACI "
        f"window a, LR warm-up {args.warmup} iterations and cosine decay to lr/10 scaled "
        f"alike). Peak LR {args.lr:g}, AdamW. Validation: {EVAL_MICRO_BATCHES} micro-batches "
        f"every {args.eval_interval * args.window * args.micro_batch_size * args.seq_length:,}"
        " tokens. Target = flush's mean final validation loss; time to target is read off "
        "the seed-mean curve, linear between evaluations; seconds are the trainer's "
        "elapsed_s (evaluation included). Speed-up = flush's time to target / the "
        f"schedule's. Rule: {DIFF_RULE}; '(same)' / '(differs)' compare against flush.",
        "",
        results_table(target, rows),
        "",
        f"P=2 wall time {t_p2:.0f} s; whole comparison {t_all:.0f} s; 1-minute load average "
        f"{load0:.2f} before, {os.getloadavg()[0]:.2f} after (2 cores). Date {stamp}.",
        "", p8,
    ])
    (out_dir / "compare.md").write_text(report)
    print("\n" + report)
    print(f"wrote {out_dir / 'compare.md'} and {out_dir / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
