"""This project against plain PyTorch and torch.distributed.pipelining, same model, same machine.

Why this exists: the schedule benchmark (bench_schedules.py) only compares this project
with itself. Here the same GPT shape is trained by (a) a plain one-process PyTorch loop,
(b) torch.distributed.pipelining's ScheduleGPipe, Schedule1F1B and ScheduleInterleaved1F1B
(2 stages per rank) on P=2 gloo processes, and (c) this project through pretrain_gpt.py: one
process, and 1f1b_flush, paci, pipedream_2bw and interleaved 1f1b_flush on P=2. Runs are
interleaved over rounds, and every ratio is taken within one round (the machine is shared).

Both sides are timed the same way, from outside: the arrival on stdout of the line each
side prints after every iteration (loss read to the host), so a side's own logging and
bookkeeping count. ``--profile`` instead runs cProfile on the one-process and P=2 paths of
both sides and prints where the time goes.

    python3 scripts/bench_peer.py --output /tmp/peer.md

The peer side is plain torch only: this file imports the project lazily, so a peer worker
process (``--worker``) neither loads nor pays for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
P = 2


@dataclass(frozen=True)
class Shape:
    """One model shape, as both sides build it (learned positions, untied head, no dropout)."""

    name: str
    num_layers: int
    hidden: int
    heads: int
    seq: int
    micro_batch: int
    vocab: int
    split: tuple[int, int]  # layers per stage at P=2; the last stage also holds the head

    @property
    def ffn(self) -> int:
        return 4 * self.hidden


# "small": the shape of the first measurement; the head (2048-way) costs about 2.7
# layers there, hence [3, 1]. "compute": compute dominates; the head is 0.7 layers: [2, 2].
SHAPES = {
    "small": Shape("small", 4, 64, 4, 64, 4, 2048, (3, 1)),
    "compute": Shape("compute", 4, 256, 4, 128, 8, 2048, (2, 2)),
}
LR = 1e-3
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
CLIP = 1.0


# --------------------------------------------------------------------------------------
# The peer: a plain-torch GPT with the project's layer structure and parameter count
# --------------------------------------------------------------------------------------
class PeerBlock(nn.Module):
    """Pre-LN block: LN, qkv, SDPA (causal), proj, residual; LN, fc1, GeLU(tanh), fc2."""

    def __init__(self, s: Shape):
        super().__init__()
        self.heads = s.heads
        self.ln1 = nn.LayerNorm(s.hidden)
        self.qkv = nn.Linear(s.hidden, 3 * s.hidden)
        self.proj = nn.Linear(s.hidden, s.hidden)
        self.ln2 = nn.LayerNorm(s.hidden)
        self.fc1 = nn.Linear(s.hidden, s.ffn)
        self.fc2 = nn.Linear(s.ffn, s.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h], batch first
        b, n, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, self.heads, 3, h // self.heads) \
            .permute(3, 0, 2, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class PeerStage(nn.Module):
    """Blocks ``[first, last)`` of the peer GPT, with the embedding on the first stage and
    the final norm and head on the last: the whole model is the one stage holding both."""

    def __init__(self, s: Shape, first: int, last: int, pre: bool, post: bool):
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.hidden) if pre else None
        self.pos = nn.Embedding(s.seq, s.hidden) if pre else None
        self.blocks = nn.ModuleList(PeerBlock(s) for _ in range(first, last))
        self.norm = nn.LayerNorm(s.hidden) if post else None
        self.head = nn.Linear(s.hidden, s.vocab, bias=False) if post else None
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok is not None:
            x = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def peer_stage_ranges(s: Shape, chunks: int) -> list[list[tuple[int, int]]]:
    """Per rank, its virtual stages' layer ranges: [split] for one chunk, one layer per
    virtual stage round-robin for two (what the project's interleaved layout gives)."""
    if chunks == 1:
        a = s.split[0]
        return [[(0, a)], [(a, s.num_layers)]]
    per = s.num_layers // (P * chunks)
    return [[((c * P + r) * per, (c * P + r + 1) * per) for c in range(chunks)]
            for r in range(P)]


def peer_model(s: Shape, first: int = 0, last: int | None = None) -> PeerStage:
    last = s.num_layers if last is None else last
    return PeerStage(s, first, last, first == 0, last == s.num_layers)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def adamw(params: list[tuple[str, nn.Parameter]]) -> torch.optim.AdamW:
    """torch's AdamW with the project's groups (no decay for biases and norm gains) and
    its default implementation on the CPU, the one the project's torch backend builds."""
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": rest, "weight_decay": 0.0}], lr=LR, betas=BETAS,
                             eps=1e-8)


def batches(s: Shape, m: int, seed: int = 0):
    """Global batches [M*b, seq+1] cut from a fixed in-memory pool of random tokens."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, s.vocab - 1, (16 * m * s.micro_batch, s.seq + 1), generator=gen)
    n = m * s.micro_batch
    i = 0
    while True:
        yield pool[i:i + n]
        i = (i + n) % (pool.shape[0] - n + 1)


# Set by ``--cprofile-to``: the loops enable it around their iterations only (set-up and
# imports left out), as the project's train_segment is wrapped (``cprofile_target``).
PROFILER = None


def profile_iterations(on: bool) -> None:
    if PROFILER is not None:
        (PROFILER.enable if on else PROFILER.disable)()


def log_iteration(k: int, n: int, loss: float) -> None:
    """The line the benchmark times, in the project's shape (`` iteration  k/  n |``)."""
    print(f" iteration {k:8d}/{n:8d} | lm loss: {loss:.6E} |", flush=True)


def write_result(out: str | None, rank: int, first_iter: float) -> None:
    if out:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "peak_rss_mb": rss, "first_iter_unix": first_iter}))


def plain_loop(s: Shape, m: int, iters: int, clip: bool, out: str | None = None) -> list[float]:
    """One process: M micro-batches accumulated (loss / M), AdamW, constant LR; ``clip``
    adds torch.nn.utils.clip_grad_norm_. Returns the losses."""
    torch.manual_seed(0)
    model = peer_model(s)
    params = list(model.named_parameters())
    opt = adamw(params)
    data = batches(s, m)
    losses, first = [], 0.0
    profile_iterations(True)
    for k in range(1, iters + 1):
        batch = next(data)
        total = torch.zeros(())
        for mb in batch.split(s.micro_batch):
            loss = loss_fn(model(mb[:, :-1]), mb[:, 1:]) / m
            loss.backward()
            total += loss.detach()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item())
        log_iteration(k, iters, losses[-1])
        first = first or time.time()
    profile_iterations(False)
    write_result(out, 0, first)
    return losses


PEER_SCHEDULES = ("gpipe", "1f1b", "interleaved")


def pipelined_loop(s: Shape, m: int, iters: int, schedule: str, out: str | None) -> None:
    """One rank of a P=2 torch.distributed.pipelining run (under torchrun, gloo)."""
    import torch.distributed as dist
    from torch.distributed import pipelining as pp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    chunks = 2 if schedule == "interleaved" else 1
    virtual = P * chunks
    stages, modules = [], []
    for c, (first, last) in enumerate(peer_stage_ranges(s, chunks)[rank]):
        mod = PeerStage(s, first, last, first == 0, last == s.num_layers)
        modules.append(mod)
        stages.append(pp.PipelineStage(mod, c * P + rank, virtual, torch.device("cpu")))
    if schedule == "interleaved":
        sched = pp.ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn)
    else:
        kind = pp.ScheduleGPipe if schedule == "gpipe" else pp.Schedule1F1B
        sched = kind(stages[0], m, loss_fn=loss_fn)
    params = [(n, p) for mod in modules for n, p in mod.named_parameters()]
    opt = adamw(params)
    data = batches(s, m)
    holds_first, holds_last = rank == 0, rank == P - 1
    first = 0.0
    profile_iterations(True)
    for k in range(1, iters + 1):
        batch = next(data)
        losses: list[torch.Tensor] = []
        if holds_first:
            sched.step(batch[:, :-1].contiguous(),
                       **({"target": batch[:, 1:].contiguous(), "losses": losses}
                          if holds_last else {}))
        else:
            sched.step(target=batch[:, 1:].contiguous(), losses=losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if holds_last:
            log_iteration(k, iters, torch.stack(losses).mean().item())
        first = first or time.time()
    profile_iterations(False)
    write_result(out, rank, first)
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# The configurations
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One thing to run: which side, how many processes, and what it does per step."""

    name: str
    side: str  # peer | project
    procs: int
    schedule: str  # plain | gpipe | 1f1b | interleaved | a project schedule
    clip: bool = False
    chunks: int = 1
    does: str = ""
    overrides: tuple[str, ...] = ()  # --ab: config overrides of a project variant
    heap: bool = False  # the peer with the project's glibc heap thresholds (heap_env)


CONFIGS = [
    Config("peer_plain", "peer", 1, "plain",
           does="plain loop: M micro-batches accumulated in .grad, AdamW, constant LR, "
                "loss.item() and one printed line per iteration, no clipping"),
    Config("peer_plain_clip", "peer", 1, "plain", clip=True,
           does="peer_plain + torch.nn.utils.clip_grad_norm_(1.0)"),
    Config("project_1p", "project", 1, "1f1b_flush",
           does="pretrain_gpt.py one process, optim.clip_grad=0 (the grad norm is still "
                "computed), constant LR, logging.interval=1"),
    Config("project_1p_clip", "project", 1, "1f1b_flush", clip=True,
           does="project_1p with optim.clip_grad=1.0"),
    Config("peer_plain_heap", "peer", 1, "plain", heap=True,
           does="peer_plain with the heap thresholds the project sets on CPU runs "
                "(MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_, utils/host_memory.py)"),
    Config("peer_gpipe", "peer", P, "gpipe", does="ScheduleGPipe, torchrun, gloo"),
    Config("peer_1f1b", "peer", P, "1f1b", does="Schedule1F1B, torchrun, gloo"),
    Config("peer_1f1b_heap", "peer", P, "1f1b", heap=True,
           does="peer_1f1b with the project's heap thresholds, as peer_plain_heap"),
    Config("peer_interleaved", "peer", P, "interleaved", chunks=2,
           does="ScheduleInterleaved1F1B, 2 stages of 1 layer per rank"),
    Config("project_flush", "project", P, "1f1b_flush",
           does="pipeline.schedule=1f1b_flush (global grad norm all-reduced over pp)"),
    Config("project_paci", "project", P, "paci", does="pipeline.schedule=paci"),
    Config("project_2bw", "project", P, "pipedream_2bw", does="pipeline.schedule=pipedream_2bw"),
    Config("project_interleaved", "project", P, "1f1b_flush", chunks=2,
           does="1f1b_flush with parallel.virtual_pipeline=2 (1 layer per virtual stage)"),
]
BY_NAME = {c.name: c for c in CONFIGS}

# (numerator, denominator, target or None): the ratios the report leads with.
RATIOS = [
    ("project_1p", "peer_plain", 0.97),
    ("project_1p_clip", "peer_plain_clip", 0.97),
    ("project_flush", "peer_1f1b", 1.0),
    ("project_paci", "peer_1f1b", None),  # 1.15 at M=4, 1.35 at M=2
    ("project_2bw", "peer_1f1b", None),
    ("project_interleaved", "peer_interleaved", 1.0),
    ("project_paci", "project_flush", None),  # 0.95 of (M+1)/M
    ("peer_1f1b", "peer_gpipe", None),
    # Against the peer given the project's heap thresholds: what is left once both
    # sides allocate alike.
    ("project_1p", "peer_plain_heap", None),
    ("project_flush", "peer_1f1b_heap", None),
    ("project_paci", "peer_1f1b_heap", None),
]


def ratio_target(num: str, den: str, m: int) -> float | None:
    for n, d, t in RATIOS:
        if (n, d) == (num, den) and t is not None:
            return t
    if (num, den) == ("project_paci", "peer_1f1b"):
        return 1.35 if m <= 2 else 1.15
    if (num, den) == ("project_paci", "project_flush"):
        return 0.95 * (m + P - 1) / m
    return None


# --------------------------------------------------------------------------------------
# Running one configuration
# --------------------------------------------------------------------------------------
ITERATION_LINE = re.compile(r"^\s*iteration\s+(\d+)/\s*(\d+)\s*\|")


@dataclass
class Run:
    config: str
    shape: str
    micro_batches: int
    round: int
    tokens_per_s: float
    first_iter_s: float  # launch to the first iteration's line
    wall_s: float
    rss_mb: list[float] = field(default_factory=list)
    other_cores: float = 0.0
    # The project's own measure of each stage's compute per micro-batch, ms: its forward
    # and backward actions (every chunk's) plus its STEP spread over the M micro-batches.
    # Receives and waits are not in it (the executor times actions after their receive).
    stage_ms: list[float] = field(default_factory=list)
    # The metrics row's action_ms itself: mean ms of each action kind ("F", "B", "S"),
    # per stage.
    action_ms: dict[str, list[float]] = field(default_factory=dict)


def stage_costs(action_ms: dict[str, list[float]], m: int, chunks: int) -> list[float]:
    """Per-stage compute per micro-batch from a metrics row's ``action_ms`` (mean ms per
    action kind and stage; a rank holding ``chunks`` chunks runs that many F and B per
    micro-batch)."""
    return [chunks * (f + b) + step / m
            for f, b, step in zip(action_ms["F"], action_ms["B"], action_ms["S"], strict=True)]


def pipeline_limit(stage_ms: Sequence[float]) -> float:
    """The most P stages on P cores can gain over one process doing the same work: total
    compute per micro-batch over the slowest stage's (one micro-batch per slowest-stage
    time, at best)."""
    return sum(stage_ms) / max(stage_ms)


def make_dataset(work: Path, s: Shape, tokens: int) -> str:
    """Random-token documents (ids below the null tokenizer's eod) as the project's
    indexed dataset; the peer draws from an in-memory pool of the same distribution."""
    import numpy as np

    from megatron_paci.data.indexed_dataset import IndexedDatasetBuilder

    prefix = work / f"random_{s.vocab}"
    if prefix.with_suffix(".idx").exists():
        return str(prefix)
    rng = np.random.default_rng(0)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", np.uint16)
    written = 0
    while written < tokens:
        doc = rng.integers(0, s.vocab - 1, int(rng.integers(200, 1200)))
        b.add_document(np.append(doc, s.vocab - 1))
        written += doc.size + 1
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


def project_overrides(c: Config, s: Shape, m: int, iters: int, data: str, run_dir: Path,
                      ) -> list[str]:
    """The project's side of a fair comparison: the peer's shape and work per step."""
    split = [] if c.chunks > 1 or c.procs == 1 else [f"pipeline.layers_per_stage=[{s.split[0]},"
                                                     f"{s.split[1]}]"]
    return [
        f"run.dir={run_dir}", f"data.path=[{data}]", f"data.tokenizer=null:{s.vocab}",
        f"model.num_layers={s.num_layers}", f"model.hidden_size={s.hidden}",
        f"model.num_attention_heads={s.heads}", f"model.seq_length={s.seq}",
        "model.tie_embeddings=false", "model.dropout=0", "model.attention_dropout=0",
        f"train.micro_batch_size={s.micro_batch}", f"train.global_batch_size={m * s.micro_batch}",
        f"train.iters={iters}", "train.device=cpu", "train.eval_interval=0",
        "train.sample_tokens=0", "checkpoint.interval=0", "checkpoint.save_at_end=false",
        "logging.interval=1", "logging.plot=false", f"optim.lr={LR}", "optim.lr_warmup_iters=0",
        "optim.lr_decay_style=constant", f"optim.clip_grad={CLIP if c.clip else 0}",
        f"optim.weight_decay={WEIGHT_DECAY}", f"optim.adam_beta1={BETAS[0]}",
        f"optim.adam_beta2={BETAS[1]}",
        f"parallel.pipeline={c.procs}", f"parallel.virtual_pipeline={c.chunks}",
        f"pipeline.schedule={c.schedule}", *split, *c.overrides,
    ]


def heap_env(c: Config) -> dict[str, str]:
    """glibc's thresholds as environment variables, for a peer process (the project sets
    them itself on CPU runs, pretrain_gpt.py)."""
    if not c.heap:
        return {}
    from megatron_paci.utils.host_memory import MMAP_THRESHOLD, TRIM_THRESHOLD

    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def command(c: Config, s: Shape, m: int, iters: int, data: str, run_dir: Path) -> list[str]:
    py = [sys.executable]
    launch = (py if c.procs == 1 else
              py + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(c.procs)])
    if c.side == "project":
        return launch + ["pretrain_gpt.py", "--config", "configs/tiny.yaml",
                         *project_overrides(c, s, m, iters, data, run_dir)]
    return launch + [str(Path(__file__).resolve()), "--worker", c.schedule, "--shape", s.name,
                     "--window", str(m), "--iters", str(iters), "--result", str(run_dir / "peer"),
                     *(["--clip"] if c.clip else [])]


def run_once(c: Config, s: Shape, m: int, rnd: int, args: argparse.Namespace, data: str,
             work: Path) -> Run:
    """Launch, time every iteration line as it arrives, read the peak RSS per stage."""
    from bench_schedules import cpu_seconds

    run_dir = work / f"{s.name}_M{m}_{c.name}_{rnd}"
    run_dir.mkdir(parents=True)
    cmd = command(c, s, m, args.iters, data, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **heap_env(c))
    stamps: dict[int, float] = {}
    (busy0, kids0), t0 = cpu_seconds(), time.perf_counter()
    with open(run_dir / "stdout.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                now = time.perf_counter()
                log.write(line)
                hit = ITERATION_LINE.match(line)
                if hit:
                    stamps.setdefault(int(hit.group(1)), now)
            rc = proc.wait()
        except BaseException:  # stopped (SIGTERM, ^C): torchrun passes SIGTERM to its ranks
            proc.terminate()
            proc.wait(30)
            raise
    (busy1, kids1), wall = cpu_seconds(), time.perf_counter() - t0
    if rc != 0 or len(stamps) < args.iters:
        tail = (run_dir / "stdout.log").read_text().splitlines()[-30:]
        raise RuntimeError(f"{c.name} ({s.name}, M={m}) failed (rc {rc}, {len(stamps)} "
                           f"iteration lines):\n" + "\n".join(tail))
    w = args.warmup
    tokens = m * s.micro_batch * s.seq
    tps = tokens * (args.iters - w) / (stamps[args.iters] - stamps[w])
    costs: list[float] = []
    action_ms: dict[str, list[float]] = {}
    if c.side == "project":
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "peak_rss_mb" in r and "action_ms" in r][-1]
        rss = last["peak_rss_mb"]
        costs = stage_costs(last["action_ms"], m, c.chunks)
        action_ms = last["action_ms"]
    else:
        rss = [json.loads((run_dir / f"peer.rank{r}.json").read_text())["peak_rss_mb"]
               for r in range(c.procs)]
    return Run(c.name, s.name, m, rnd, tps, stamps[1] - t0, wall, rss,
               max(0.0, (busy1 - busy0) - (kids1 - kids0)) / wall, costs, action_ms)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def per_round(runs: Sequence[Run], shape: str, m: int, name: str) -> dict[int, Run]:
    return {r.round: r for r in runs if (r.shape, r.micro_batches, r.config) == (shape, m, name)}


def round_ratios(runs: Sequence[Run], shape: str, m: int, num: str, den: str) -> list[float]:
    """num/den tokens/s within each round both ran, in round order."""
    a, b = per_round(runs, shape, m, num), per_round(runs, shape, m, den)
    return [a[k].tokens_per_s / b[k].tokens_per_s for k in sorted(a.keys() & b.keys())]


def report(runs: Sequence[Run], args: argparse.Namespace) -> str:
    from bench_schedules import pair, table

    out = []
    for shape in args.shapes:
        s = SHAPES[shape]
        for m in args.micro_batches[shape]:
            out += [f"#### {shape}: {s.num_layers} layers, hidden {s.hidden}, {s.heads} heads, "
                    f"sequence {s.seq}, micro-batch {s.micro_batch}, vocabulary {s.vocab}, "
                    f"M={m}, P=2 split [{s.split[0]},{s.split[1]}]", ""]
            rows = []
            for num, den, _ in RATIOS:
                rs = round_ratios(runs, shape, m, num, den)
                if not rs:
                    continue
                t = ratio_target(num, den, m)
                med = statistics.median(rs)
                rows.append([f"{num} / {den}", pair(rs), f"**{med:.2f}**",
                             "-" if t is None else f"{t:.2f}",
                             "-" if t is None else ("met" if med >= t else "missed")])
            out += [table(["ratio", "per round", "median", "target", ""], rows), ""]
            rows = []
            for c in CONFIGS:
                mine = [r for _, r in sorted(per_round(runs, shape, m, c.name).items())]
                if not mine:
                    continue
                rss = [statistics.mean(x) for x in zip(*(r.rss_mb for r in mine), strict=True)]
                rows.append([c.name, pair([r.tokens_per_s for r in mine], "{:.0f}"),
                             f"{statistics.median(r.tokens_per_s for r in mine):.0f}",
                             pair(rss, "{:.0f}"),
                             f"{statistics.median(r.first_iter_s for r in mine):.1f}",
                             pair([r.other_cores for r in mine])])
            out += [table(["config", "tokens/s per round", "median tokens/s",
                           "peak RSS MB per stage (mean)", "launch to iteration 1, s (median)",
                           "other load (cores) per round"], rows), ""]
            out += limit_table(runs, shape, m)
            out += schedule_ratio_table(runs, shape, m)
            out += ab_table(runs, args, shape, m)
            out += side_table(runs, args, shape, m)
    return "\n".join(out)


def side_table(runs: Sequence[Run], args: argparse.Namespace, shape: str,
               m: int) -> list[str]:
    """``--side-by-side``: each copy's tokens/s beside a neighbour over the same
    configuration alone in that round."""
    from bench_schedules import pair, table

    rows = []
    for name in args.configs:
        alone = per_round(runs, shape, m, name)
        firsts, seconds = (per_round(runs, shape, m, f"{name}{PAIR}{k}") for k in (1, 2))
        rounds = sorted(alone.keys() & firsts.keys() & seconds.keys())
        if not rounds:
            continue
        ratios = [statistics.mean([firsts[k].tokens_per_s, seconds[k].tokens_per_s])
                  / alone[k].tokens_per_s for k in rounds]
        rows.append([name, pair([alone[k].tokens_per_s for k in rounds], "{:.0f}"),
                     " / ".join(f"{firsts[k].tokens_per_s:.0f}+{seconds[k].tokens_per_s:.0f}"
                                for k in rounds),
                     pair(ratios), f"**{statistics.median(ratios):.2f}**"])
    return ["Side by side: two copies launched together (one per core), each copy's tokens/s "
            "over the configuration alone in the same round.", "",
            table(["config", "alone tokens/s", "two at once, tokens/s each",
                   "mean of the two / alone", "median"], rows), ""] if rows else []


def ab_variant(name: str, override: str) -> str:
    """The name ``--ab`` gives a configuration run with ``override``."""
    return f"{name}+{override}"


def ab_table(runs: Sequence[Run], args: argparse.Namespace, shape: str, m: int) -> list[str]:
    """``--ab KEY=VALUE``: each project configuration's variant against it, per round."""
    from bench_schedules import pair, table

    if not args.ab:
        return []
    rows = []
    for name in args.configs:
        variant = ab_variant(name, args.ab)
        rs = round_ratios(runs, shape, m, variant, name)
        if rs:
            tps = [r.tokens_per_s for _, r in sorted(per_round(runs, shape, m, variant).items())]
            rows.append([name, pair(tps, "{:.0f}"), pair(rs), f"**{statistics.median(rs):.2f}**"])
    return [f"A/B: `{args.ab}` against each project configuration without it (same round, "
            "launched right after it).", "",
            table(["config", f"tokens/s with {args.ab} per round", "ratio to without",
                   "median"], rows), ""] if rows else []


def limit_table(runs: Sequence[Run], shape: str, m: int) -> list[str]:
    """Each pipelined project run against its own limit: the speedup over the one-process
    run of the same round, as a fraction of sum/max of the run's measured stage costs."""
    from bench_schedules import pair, table

    ones = per_round(runs, shape, m, "project_1p")
    rows = []
    for c in CONFIGS:
        if c.side != "project" or c.procs == 1:
            continue
        mine = [(k, r) for k, r in sorted(per_round(runs, shape, m, c.name).items())
                if r.stage_ms and k in ones]
        if not mine:
            continue
        limits = [pipeline_limit(r.stage_ms) for _, r in mine]
        speedups = [r.tokens_per_s / ones[k].tokens_per_s for k, r in mine]
        reached = [x / lim for x, lim in zip(speedups, limits, strict=True)]
        costs = [statistics.mean(x) for x in zip(*(r.stage_ms for _, r in mine), strict=True)]
        rows.append([c.name, pair(costs), pair(limits), pair(speedups), pair(reached),
                     f"**{statistics.median(reached):.0%}**"])
    if not rows:
        return []
    # The one-process run's own F + B + STEP/M: what the stages' sum compares against.
    one = [r.stage_ms[0] for _, r in sorted(ones.items()) if r.stage_ms]
    if one:
        rows.append(["project_1p (whole model, for reference)", pair(one), "-", "-", "-", "-"])
    return ["Against the limit: stage compute per micro-batch (F + B + STEP/M, the project's "
            "own action times, mean over rounds), the limit sum/max of it, the speedup over "
            "project_1p in the same round, and the fraction of the limit that is (per round, "
            "then the median).", "",
            table(["config", "stage ms per micro-batch", "limit", "speedup over project_1p",
                   "fraction of limit", "median"], rows), ""]


def simulated_window_ms(schedule: str, action_ms: dict[str, list[float]], m: int) -> float:
    """Steady-state ms per window (iteration) of ``schedule`` with these per-stage action
    times, by the project's schedule simulator (the executor's own action lists, no p2p
    cost): the makespan difference between 20 and 10 windows, over 10."""
    from megatron_paci.pipeline.simulate import Costs, simulate

    costs = [Costs(f, b, step, 0.0) for f, b, step in
             zip(action_ms["F"], action_ms["B"], action_ms["S"], strict=True)]
    span = [simulate(schedule, len(costs), m, w, per_stage_costs=costs).makespan
            for w in (10, 20)]
    return (span[1] - span[0]) / 10


def schedule_ratio_table(runs: Sequence[Run], shape: str, m: int) -> list[str]:
    """PACI / flush as measured beside what their measured action times allow: (M+1)/M
    holds for equal stages only; with unequal ones the flush's bubble is smaller."""
    from bench_schedules import pair, table

    flush = per_round(runs, shape, m, "project_flush")
    paci = per_round(runs, shape, m, "project_paci")
    rounds = [k for k in sorted(paci) if k in flush and paci[k].action_ms
              and flush[k].action_ms]
    if not rounds:
        return []
    measured = [paci[k].tokens_per_s / flush[k].tokens_per_s for k in rounds]
    allowed = [simulated_window_ms("1f1b_flush", flush[k].action_ms, m)
               / simulated_window_ms("paci", paci[k].action_ms, m) for k in rounds]
    reached = [x / a for x, a in zip(measured, allowed, strict=True)]
    row = [pair(measured), pair(allowed), f"{(m + 1) / m:.2f}", pair(reached),
           f"**{statistics.median(reached):.0%}**"]
    return ["PACI / flush against what the stage costs allow: the steady-state window time "
            "of each schedule simulated (megatron_paci.pipeline.simulate) with its own run's "
            "F, B and STEP times per stage, per round; (M+1)/M is the same for equal "
            "stages.", "",
            table(["project_paci / project_flush per round", "allowed by the stage costs",
                   "(M+1)/M", "measured / allowed", "median"], [row]), ""]


def describe_configs(names: Sequence[str]) -> str:
    return "\n".join(f"- `{n}`: {BY_NAME[n].does}" for n in names)


# --------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------
# Where a step's time goes, as (label, file suffix, function name): cumulative time of that
# function per iteration. Rows nest (hooks run inside backward, the norm inside the step);
# the table says which row holds which.
PROJECT_ROWS = [
    ("training loop (profiled iterations, total)", "", ""),
    ("  forward (policy.forward -> GPTModel)", "model/gpt.py", "forward"),
    ("  backward (torch.autograd.backward)", "torch/autograd/__init__.py", "backward"),
    ("    grad hooks (bf16 params or dp > 1 only)", "optim/grad_sync.py", "_on_grad_ready"),
    ("  data loading (DataLoader.__next__)", "utils/data/dataloader.py", "__next__"),
    ("  receive, incl. waiting for the peer (_recv)", "pipeline/executor.py", "_recv"),
    ("  sends (_send)", "pipeline/executor.py", "_send"),
    ("  pending-send bookkeeping (_keep_until_sent)", "pipeline/executor.py",
     "_keep_until_sent"),
    ("  flush barrier (comm.barrier)", "parallel/comm.py", "barrier"),
    ("  STEP (executor._step)", "pipeline/executor.py", "_step"),
    ("    Optimizer.step", "optim/optimizer.py", "step"),
    ("      grad norm (_grad_norm, fp64 over buffer segments)", "optim/optimizer.py",
     "_grad_norm"),
    ("      finish_grad_sync", "optim/grad_sync.py", "finish_grad_sync"),
    ("      torch AdamW.step", "torch/optim/adam.py", "step"),  # AdamW is an Adam
    ("    zero_grad (GradBuffer)", "optim/grad_sync.py", "zero_grad"),
    ("    weight-version policy before/after step", "pipeline/versions.py", "after_step"),
    ("  per-iteration bookkeeping (Trainer._after_step)", "training/trainer.py", "_after_step"),
    ("    loss to the host (_mean_over_dp)", "training/trainer.py", "_mean_over_dp"),
    ("    log row + line (_log_train)", "training/trainer.py", "_log_train"),
    ("  action marks (_event + _read_marks)", "pipeline/executor.py", "_event"),
    ("  liveness.set_operation per action", "parallel/liveness.py", "set_operation"),
]
PEER_ROWS = [
    ("training loop (profiled iterations, total)", "", ""),
    ("  schedule.step (pipelining)", "pipelining/schedules.py", "step"),
    ("  forward (PeerStage)", "bench_peer.py", "forward"),
    ("  backward (Tensor.backward / autograd)", "torch/_tensor.py", "backward"),
    ("  backward (pipelining stage_backward)", "pipelining/_backward.py", "stage_backward"),
    ("  clip_grad_norm_", "nn/utils/clip_grad.py", "clip_grad_norm_"),
    ("  torch AdamW.step", "torch/optim/adam.py", "step"),
    ("  zero_grad", "torch/optim/optimizer.py", "zero_grad"),
    ("  loss.item() + print (log_iteration)", "bench_peer.py", "log_iteration"),
]
PROFILED = ["peer_plain", "project_1p", "peer_1f1b", "project_flush", "project_paci"]


def profiled_command(c: Config, s: Shape, m: int, iters: int, data: str, run_dir: Path,
                     ) -> list[str]:
    """``command`` with every process run under cProfile (``--cprofile-to``)."""
    cmd = command(c, s, m, iters, data, run_dir)
    i = next(k for k, a in enumerate(cmd) if a.endswith(".py"))
    return cmd[:i] + [str(Path(__file__).resolve()), "--cprofile-to",
                      str(run_dir / "prof")] + cmd[i:]


def cprofile_target(path: str, target: list[str]) -> int:
    """Run ``target`` (pretrain_gpt.py or a peer worker, with arguments) with cProfile on
    during the training iterations only; stats per rank to ``path.rankR``."""
    import cProfile

    global PROFILER
    PROFILER = prof = cProfile.Profile()
    code = 0
    try:
        if Path(target[0]).name == "pretrain_gpt.py":
            sys.path.insert(0, str(ROOT))
            from megatron_paci.pipeline.executor import PipelineExecutor

            segment = PipelineExecutor.train_segment

            def profiled(self, *a, **kw):
                prof.enable()
                try:
                    return segment(self, *a, **kw)
                finally:
                    prof.disable()

            PipelineExecutor.train_segment = profiled  # the bench's wrapper, not the code's
            import pretrain_gpt

            code = pretrain_gpt.main(target[1:])
        else:
            code = main(target[1:])
    except SystemExit as e:
        code = int(e.code or 0)
    prof.dump_stats(f"{path}.rank{os.environ.get('RANK', '0')}")
    return code


def stage_rows(stats_path: str, rows: list[tuple[str, str, str]], iters: int,
               ) -> list[tuple[str, float]]:
    """(label, ms per iteration) of ``rows`` present in one process's profile."""
    import pstats

    stats = pstats.Stats(stats_path)
    st = stats.stats
    out, seen = [], set()
    for label, suffix, func in rows:
        # The outermost match (forward nests in forward): the largest cumulative time.
        ct = (stats.total_tt if not func else
              max((v[3] for (f, _, name), v in st.items()
                   if f.endswith(suffix) and name == func), default=0.0))
        if label == "  action marks (_event + _read_marks)":
            ct += max((v[3] for (f, _, name), v in st.items()
                       if f.endswith(suffix) and name == "_read_marks"), default=0.0)
        if label == "    weight-version policy before/after step":
            ct += max((v[3] for (f, _, name), v in st.items()
                       if f.endswith(suffix) and name == "before_step"), default=0.0)
        if ct > 0 and label not in seen:
            seen.add(label)
            out.append((label, 1000.0 * ct / iters))
    return out


def top_functions(stats_path: str, iters: int, n: int = 12) -> list[tuple[str, float]]:
    """The ``n`` functions with the most own time (tottime), ms per iteration."""
    import pstats

    st = pstats.Stats(stats_path).stats
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:n]
    return [(f"{Path(f).name}:{line} {name}" if f != "~" else name, 1000.0 * v[2] / iters)
            for (f, line, name), v in top]


def interleaved_medians(fns: dict[str, tuple], reps: int) -> dict[str, float]:
    """Median ms of each ``(fn, setup)``, the candidates taking turns rep by rep."""
    xs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, (fn, setup) in fns.items():
            if setup:
                setup()
            t = time.perf_counter()
            fn()
            xs[k].append(time.perf_counter() - t)
    return {k: 1000.0 * statistics.median(v) for k, v in xs.items()}


def microbench(s: Shape, m: int, reps: int = 30) -> list[list[str]]:
    """Direct timings (no profiler) of candidate costs in one process, on the project's own
    model and optimizer; each pair differs in one thing only and the two take turns."""
    from megatron_paci.config.schema import ModelConfig, OptimConfig
    from megatron_paci.model.gpt import GPTModel
    from megatron_paci.optim.optimizer import Optimizer
    from megatron_paci.parallel.state import single_process

    torch.set_num_threads(1)  # as every training process runs
    cfg = ModelConfig(num_layers=s.num_layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                      seq_length=s.seq, tie_embeddings=False, dropout=0.0,
                      attention_dropout=0.0)
    hooked, plain = GPTModel(cfg, s.vocab), GPTModel(cfg, s.vocab)
    opt = Optimizer(hooked, OptimConfig(lr=LR, clip_grad=0.0), single_process())
    gen = torch.Generator().manual_seed(0)
    mbs = [torch.randint(0, s.vocab - 1, (s.micro_batch, s.seq + 1), generator=gen)
           for _ in range(m)]

    def fwd_bwd(model, buffer=None):
        def run() -> None:
            for i, mb in enumerate(mbs):
                if buffer is not None:
                    buffer.sync_enabled = i == m - 1  # as the executor sets it
                (model(tokens=mb[:, :-1], labels=mb[:, 1:]).mean() / m).backward()
        return run

    t = interleaved_medians({
        "hooks": (fwd_bwd(hooked, opt.grad_buffer), opt.zero_grad),
        "plain": (fwd_bwd(plain), lambda: plain.zero_grad(set_to_none=True))}, reps)
    rows = [["M forward+backward, into GradBuffer (.grad aliases main_grad) vs plain .grad "
             "accumulation",
             f"{t['hooks']:.2f}", f"{t['plain']:.2f}", f"{t['hooks'] - t['plain']:+.2f}"]]
    peer = peer_model(s)

    def peer_fwd_bwd() -> None:
        for mb in mbs:
            (loss_fn(peer(mb[:, :-1]), mb[:, 1:]) / m).backward()

    t = interleaved_medians({
        "mine": (fwd_bwd(plain), lambda: plain.zero_grad(set_to_none=True)),
        "peer": (peer_fwd_bwd, lambda: peer.zero_grad(set_to_none=True))}, reps)
    rows.append(["M forward+backward, no hooks: GPTModel ([s, b, h], kernel dispatch, "
                 "vocab-parallel cross-entropy) vs the peer's model (batch first, "
                 "F.cross_entropy)", f"{t['mine']:.2f}", f"{t['peer']:.2f}",
                 f"{t['mine'] - t['peer']:+.2f}"])
    from megatron_paci.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    logits = torch.randn(s.seq, s.micro_batch, s.vocab, requires_grad=True, generator=gen)
    target = torch.randint(0, s.vocab, (s.seq, s.micro_batch), generator=gen)
    t = interleaved_medians({
        "mine": (lambda: vocab_parallel_cross_entropy(logits, target, None).mean().backward(),
                 None),
        "torch": (lambda: loss_fn(logits, target).backward(), None)}, reps)
    rows.append(["cross-entropy forward+backward, one micro-batch: vocab_parallel_cross_entropy "
                 "(tp=1) vs F.cross_entropy", f"{t['mine']:.2f}", f"{t['torch']:.2f}",
                 f"{t['mine'] - t['torch']:+.2f}"])
    opt.zero_grad()
    fwd_bwd(hooked, opt.grad_buffer)()  # gradients in main_grad for what follows
    grads = [p.main_grad for p in opt.params]
    t = interleaved_medians({
        "mine": (opt._grad_norm, None),
        "torch": (lambda: torch.nn.utils.get_total_norm(grads).item(), None)}, reps)
    rows.append(["grad norm: Optimizer._grad_norm (fp64, buffer segments) vs "
                 "torch.nn.utils.get_total_norm (fp32), each with .item()",
                 f"{t['mine']:.2f}", f"{t['torch']:.2f}", f"{t['mine'] - t['torch']:+.2f}"])
    adams = {}
    for label, kw in (("default", {}), ("foreach", {"foreach": True}),
                      ("fused", {"fused": True})):
        params = [p.detach().clone() for p in opt.params]
        for q, g in zip(params, grads, strict=True):
            q.grad = g.clone()
        o = torch.optim.AdamW([{"params": [q for q in params if q.ndim >= 2],
                                "weight_decay": WEIGHT_DECAY},
                               {"params": [q for q in params if q.ndim < 2],
                                "weight_decay": 0.0}], lr=LR, betas=BETAS, **kw)
        o.step()  # state allocated outside the timing
        adams[label] = (o.step, None)
    opt.step(LR)
    saved = [g.clone() for g in grads]

    def refill() -> None:
        for g, x in zip(grads, saved, strict=True):
            g.copy_(x)

    t = interleaved_medians({"step": (lambda: opt.step(LR), refill), **adams}, reps)
    rows.append(["Optimizer.step (grad norm + fused AdamW) vs torch AdamW (default) alone",
                 f"{t['step']:.2f}", f"{t['default']:.2f}", f"{t['step'] - t['default']:+.2f}"])
    for label in ("foreach", "fused"):
        rows.append([f"AdamW default for-loop (the peer's choice on CPU) vs "
                     f"{label}=True", f"{t['default']:.2f}", f"{t[label]:.2f}",
                     f"{t['default'] - t[label]:+.2f}"])
    return rows


def profile_all(args: argparse.Namespace) -> int:
    """cProfile both sides' one-process and P=2 paths; print per-iteration costs."""
    from bench_schedules import table

    shape = args.shapes[0]
    s, m = SHAPES[shape], args.micro_batches[shape][0]
    profiled = [n for n in PROFILED if n in args.configs and not args.ab_only]
    if args.dry_run:  # the profiled launches, then what the A/B part would time
        for name in profiled:
            run_dir = Path("RUN") / name
            print(shlex.join(profiled_command(BY_NAME[name], s, m, args.iters, "DATA",
                                              run_dir)))
        print(f"then the direct one-process A/B timings, {shape} shape, M={m}, median of "
              f"{args.ab_reps} (in this process)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_peer_prof_"))
    lines = [f"Profile: {shape} shape, M={m}, {args.iters} iterations under cProfile (which "
             "inflates Python-heavy code: hooks, executor bookkeeping). ms per iteration, "
             "cumulative (nested rows are part of their parent).", ""]
    try:
        data = make_dataset(work, s, 4 * args.iters * m * s.micro_batch * (s.seq + 1))
        for name in profiled:
            c = BY_NAME[name]
            run_dir = work / name
            run_dir.mkdir()
            cmd = profiled_command(c, s, m, args.iters, data, run_dir)
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"profiling {name} failed:\n{proc.stdout[-3000:]}"
                                   f"{proc.stderr[-3000:]}")
            rows = PROJECT_ROWS if c.side == "project" else PEER_ROWS
            per_rank = [stage_rows(str(run_dir / f"prof.rank{r}"), rows, args.iters)
                        for r in range(c.procs)]
            labels = list(dict.fromkeys(lab for pr in per_rank for lab, _ in pr))
            body = [[lab] + [next((f"{v:.2f}" for x, v in pr if x == lab), "-")
                             for pr in per_rank] for lab in labels]
            head = ["cost", *(f"rank {r} ms/iter" for r in range(c.procs))]
            lines += [f"##### {name}: {c.does}", "", table(head, body), ""]
            for r in range(c.procs):
                top = top_functions(str(run_dir / f"prof.rank{r}"), args.iters)
                lines += [f"Top own time, {name} rank {r} (ms/iter): "
                          + "; ".join(f"{n} {v:.2f}" for n, v in top), ""]
        lines += [f"##### Direct timings, one process, {shape} shape, M={m} (no profiler, "
                  f"median of {args.ab_reps}, the two sides of each row taking turns)", "",
                  table(["what", "project ms", "alternative ms", "difference ms"],
                        microbench(s, m, args.ab_reps)), ""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def check_parameter_counts(s: Shape) -> tuple[int, list[int]]:
    """The peer's parameter count, whole and per P=2 stage, equals the project's; returns it."""
    from megatron_paci.config.schema import ModelConfig
    from megatron_paci.model.gpt import GPTModel, StageSpec, count_parameters

    cfg = ModelConfig(num_layers=s.num_layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                      seq_length=s.seq, tie_embeddings=False, dropout=0.0,
                      attention_dropout=0.0)
    whole = count_parameters(GPTModel(cfg, s.vocab))
    peer = count_parameters(peer_model(s))
    assert whole == peer, f"{s.name}: project {whole} parameters, peer {peer}"
    stages = []
    for chunks in (1, 2):
        for r, ranges in enumerate(peer_stage_ranges(s, chunks)):
            spec = StageSpec.of_chunks(ranges, r == 0, r == P - 1)
            mine = count_parameters(GPTModel(cfg, s.vocab, stage=spec))
            theirs = sum(count_parameters(peer_model(s, a, b)) for a, b in ranges)
            assert mine == theirs, f"{s.name} stage {r} ({chunks} chunks): {mine} vs {theirs}"
            if chunks == 1:
                stages.append(mine)
    return whole, stages


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["small", "compute"], choices=list(SHAPES))
    p.add_argument("--micro-batches", nargs="+", default=None,
                   help="values of M, e.g. 2 4 (default: 2 4 for small, 4 for compute); "
                        "SHAPE:M pairs (small:2 compute:4) pick per shape")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="iterations left out of the timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS],
                   choices=[c.name for c in CONFIGS])
    p.add_argument("--quick", action="store_true",
                   help="1 round of 4 iterations, small shape, M=2 (a check that it runs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--profile", action="store_true", help="cProfile both sides (see docs)")
    p.add_argument("--ab-reps", type=int, default=30,
                   help="repetitions of each direct A/B timing that ends --profile")
    p.add_argument("--ab-only", action="store_true",
                   help="with --profile: only the direct A/B timings (no cProfile runs)")
    p.add_argument("--ab", metavar="KEY=VALUE",
                   help="also run every project configuration with this config override, "
                        "right after it in each round, and report the ratio (e.g. "
                        "data.prefetch=2)")
    p.add_argument("--side-by-side", action="store_true",
                   help="also run two copies of every one-process configuration at once in "
                        "each round: how much a process slows beside a neighbour")
    p.add_argument("--output", help="write the markdown report here (default: print only)")
    p.add_argument("--keep-runs", action="store_true")
    # A peer worker process (internal).
    p.add_argument("--worker", choices=["plain", *PEER_SCHEDULES], help=argparse.SUPPRESS)
    p.add_argument("--shape", default="small", help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--clip", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.iters, args.warmup = 1, 4, 1
        args.shapes = ["small"]
        args.micro_batches = args.micro_batches or ["2"]
    per_shape: dict[str, list[int]] = {"small": [2, 4], "compute": [4]}
    if args.micro_batches:
        given = {sh: [] for sh in args.shapes}
        for item in args.micro_batches:
            sh, _, m = item.rpartition(":")
            for name in ([sh] if sh else args.shapes):
                given.setdefault(name, []).append(int(m))
        per_shape = given
    args.micro_batches = {sh: per_shape.get(sh, []) for sh in args.shapes}
    if not args.worker and (args.warmup < 1 or args.iters <= args.warmup):
        p.error(f"--iters ({args.iters}) must exceed --warmup ({args.warmup}) >= 1")
    return args


def run_all(args: argparse.Namespace, work: Path, runs: list[Run]) -> str:
    """Every configuration, interleaved over rounds, appended to ``runs``; returns "" or,
    when stopped (SIGTERM from ``timeout``, ^C), a line saying where."""
    configs = []
    for c in (BY_NAME[n] for n in args.configs):
        configs.append(c)
        if args.ab and c.side == "project":  # the variant right after its base, every round
            configs.append(dataclasses.replace(c, name=ab_variant(c.name, args.ab),
                                               overrides=(args.ab,)))
    for shape in args.shapes:
        s = SHAPES[shape]
        biggest = max(args.micro_batches[shape], default=1)
        data = ("DATA" if args.dry_run else
                make_dataset(work, s, 4 * args.iters * biggest * s.micro_batch * (s.seq + 1)))
        for m in args.micro_batches[shape]:
            for rnd in range(1, args.rounds + 1):
                for c in configs:
                    if args.dry_run:
                        print(" ".join([*(f"{k}={v}" for k, v in heap_env(c).items()),
                                        *command(c, s, m, args.iters, data,
                                                 work / f"{shape}_M{m}_{c.name}_{rnd}")]))
                        continue
                    try:
                        r = run_once(c, s, m, rnd, args, data, work)
                    except KeyboardInterrupt:
                        return (f"Stopped during {shape} M={m} round {rnd} ({c.name}); the "
                                f"{len(runs)} runs finished before are reported.")
                    print(f"{shape} M={m} round {rnd} {c.name:20s} {r.tokens_per_s:8.0f} "
                          f"tokens/s, iteration 1 at {r.first_iter_s:4.1f} s, RSS "
                          f"{'/'.join(f'{x:.0f}' for x in r.rss_mb)} MB, other load "
                          f"{r.other_cores:.2f} cores", flush=True)
                    runs.append(r)
                    if args.side_by_side and c.procs == 1:
                        pair = side_by_side(c, s, m, rnd, args, data, work)
                        print(f"{shape} M={m} round {rnd} {c.name:20s} two at once: "
                              + " / ".join(f"{x.tokens_per_s:.0f}" for x in pair)
                              + " tokens/s", flush=True)
                        runs.extend(pair)
    return ""


def side_by_side(c: Config, s: Shape, m: int, rnd: int, args: argparse.Namespace, data: str,
                 work: Path) -> list[Run]:
    """Two copies of a one-process configuration launched together, one per core: how much
    a process slows beside a neighbour (P=2 stages always have one)."""
    import concurrent.futures

    copies = [dataclasses.replace(c, name=f"{c.name}{PAIR}{k}") for k in (1, 2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda x: run_once(x, s, m, rnd, args, data, work), copies))


PAIR = "_side"


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--cprofile-to"]:  # a profiled process (internal)
        return cprofile_target(argv[1], argv[2:])
    args = parse(argv)
    if args.worker:
        s = SHAPES[args.shape]
        if args.worker == "plain":
            plain_loop(s, args.window, args.iters, args.clip, args.result)
        else:
            pipelined_loop(s, args.window, args.iters, args.worker, args.result)
        return 0
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    if args.profile:
        return profile_all(args)
    for shape in args.shapes:
        whole, stages = check_parameter_counts(SHAPES[shape])
        print(f"{shape}: {whole} parameters on both sides; P=2 stages {stages}", flush=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    # ``timeout``: report the runs finished so far (the caller's handler back at the end)
    previous = signal.signal(signal.SIGTERM, _stop)
    work = Path(tempfile.mkdtemp(prefix="bench_peer_"))
    runs: list[Run] = []
    try:
        stopped = run_all(args, work, runs)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep_runs:
            print(f"run directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.dry_run:
        return 0
    text = "\n".join([
        f"P={P} where pipelined, gloo, one thread per process (OMP_NUM_THREADS=1); "
        f"{args.iters} iterations, the first {args.warmup} left out; {args.rounds} "
        "interleaved rounds. Tokens/s = tokens of the timed iterations / the time between the "
        f"stdout lines of iterations {args.warmup} and {args.iters}, as the benchmark "
        "received them; ratios are taken within a round, and their median over rounds is "
        "the number to read. Peak RSS per stage is each process's ru_maxrss. 'Other load' is "
        "CPU that processes outside the run used meanwhile, in cores out of 2.", "",
        *([stopped, ""] if stopped else []),
        "What each side does per step:", "", describe_configs(args.configs), "",
        report(runs, args),
        f"Benchmark wall time: {time.time() - t0:.0f} s; 1-minute load average {load0:.2f} "
        f"before, {os.getloadavg()[0]:.2f} after.",
    ]) + "\n"
    print("\n" + text)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
