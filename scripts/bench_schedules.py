"""Benchmark the three pipeline schedules side by side on this machine (P=2), then project.

Why this exists: the claim that PACI (and 2BW) remove the 1F1B-flush bubble should be checked
on real processes, not only in the simulator. The script trains the same tiny GPT on the same
data with each schedule, M micro-batches per global batch, two processes (one pipeline stage
each, one thread each), and reports tokens/s, the measured bubble, peak memory and the mean
per-action times of each stage. Runs are interleaved (flush, 2BW, PACI, flush, 2BW, PACI, ...)
because the machine is shared and noisy: ratios are taken within one round, never across.

The measured per-action costs then feed the simulator, which projects bubble and throughput
relative to flush to deeper pipelines (P = 4 .. 32) that this machine cannot run.

    python3 scripts/bench_schedules.py --output /tmp/bench.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_paci.pipeline.registry import get_schedule, schedule_names  # noqa: E402
from megatron_paci.pipeline.schedules import FLUSH, PACI  # noqa: E402
from megatron_paci.pipeline.simulate import Costs, simulate  # noqa: E402

# The registered schedules; the baseline every ratio is taken against and the schedule
# whose ideal speed-up the verdict checks come from the registry's declarations.
SCHEDULES = schedule_names()
BASELINE, CANDIDATE = FLUSH.name, PACI.name
P = 2


@dataclass
class Run:
    """What one training run measured (per-stage lists are indexed by stage)."""

    schedule: str
    micro_batches: int
    round: int
    tokens_per_s: float  # median over post-warm-up iterations
    ms_per_iter: float
    bubble: list[float]
    rss_mb: list[float]
    f_ms: list[float]
    b_ms: list[float]
    s_ms: list[float]
    other_cores: float  # CPU used by processes other than this run, in cores (contention)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def ensure_data(work: Path, fresh: bool = False) -> tuple[str, str]:
    """The quickstart dataset when it exists; otherwise a small one built in ``work``.

    A fresh clone has no data/, so the benchmark builds ~1 MB of Python documentation text
    with the project's own tools. The vocabulary stays 4096 like the quickstart's, because the
    output layer's size decides how the layers are balanced between the two stages.
    """
    prefix = ROOT / "data/quickstart/corpus_text_document"
    tok = ROOT / "data/quickstart/tokenizer.model"
    if not fresh and prefix.with_suffix(".idx").exists() and tok.exists():
        return str(prefix), str(tok)
    data = work / "data"
    print(f"no quickstart data; building a small corpus in {data}", flush=True)
    py = [sys.executable, "-m"]
    steps = [
        ["data_prep.build_corpus", "--output", str(data), "--sources", "pydoc", "--max-mb", "1"],
        ["data_prep.train_tokenizer", "--input", str(data / "corpus.jsonl"),
         "--vocab-size", "4096", "--output", str(data / "tokenizer")],
        ["data_prep.preprocess", "--input", str(data / "corpus.jsonl"),
         "--tokenizer", str(data / "tokenizer.model"),
         "--output-prefix", str(data / "corpus_text_document"), "--append-eod", "--workers", "1"],
    ]  # fmt: skip
    for cmd in steps:
        subprocess.run(py + cmd, cwd=ROOT, check=True)
    return str(data / "corpus_text_document"), str(data / "tokenizer.model")


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------
def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, by this process's waited-for children).

    The difference over a run is what other processes took from the two cores; the
    machine is shared, so each run reports it rather than hiding the noise.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan"), 0.0
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), kids.ru_utime + kids.ru_stime


def train_once(args: argparse.Namespace, schedule: str, m: int, rnd: int, data: tuple[str, str],
               work: Path) -> Run:
    """Launch one P=2 training run through torchrun and read its metrics.jsonl."""
    run_dir = work / f"M{m}_{schedule}_{rnd}"
    overrides = [
        f"run.dir={run_dir}",
        f"data.path=[{data[0]}]",
        f"data.tokenizer={data[1]}",
        f"parallel.pipeline={P}",
        f"pipeline.schedule={schedule}",
        f"pipeline.layers_per_stage=[{args.split}]",
        f"model.num_layers={args.num_layers}",
        f"train.iters={args.iters}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.global_batch_size={m * args.micro_batch_size}",
        "train.eval_interval=0",
        "train.sample_tokens=0",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "logging.interval=1",
        "logging.plot=false",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(P), "pretrain_gpt.py", "--config", args.config, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir.mkdir(parents=True)
    (busy0, kids0), t0 = cpu_seconds(), time.perf_counter()
    with open(run_dir / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    (busy1, kids1), wall = cpu_seconds(), time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (run_dir / "stdout.log").read_text().splitlines()[-30:]
        raise RuntimeError(f"{schedule} M={m} failed (rc {proc.returncode}):\n" + "\n".join(tail))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    iters = [r for r in rows if "tokens_per_s" in r and r["iteration"] > args.warmup]
    drain = [r for r in rows if "action_ms" in r][-1]
    ms = drain["action_ms"]
    return Run(schedule, m, rnd,
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in iters),
               ms_per_iter=statistics.median(r["ms_per_iter"] for r in iters),
               bubble=drain["bubble_per_stage"], rss_mb=drain["peak_rss_mb"],
               f_ms=ms["F"], b_ms=ms["B"], s_ms=ms["S"],
               other_cores=max(0.0, (busy1 - busy0) - (kids1 - kids0)) / wall)  # fmt: skip


# --------------------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------------------
def window_time(name: str, stages: int, m: int, costs: Sequence[Costs]) -> float:
    """Steady-state time of one window: the makespan difference between W and 2W windows.

    Subtracting two runs cancels the fill and drain, which are paid once per run (2BW, PACI)
    and would otherwise dominate a short simulated run of a deep pipeline.
    """
    w = max(4, -(-4 * stages // m))
    t1 = simulate(name, stages, m, w, per_stage_costs=costs).makespan
    t2 = simulate(name, stages, m, 2 * w, per_stage_costs=costs).makespan
    return (t2 - t1) / w


def fit_p2p(stage_costs: list[Costs], m: int, measured_ms: float) -> float:
    """p2p latency (ms) that makes the simulated PACI window as long as the measured one.

    The executor's F/B times exclude waiting for a neighbour, so whatever the measured window
    has beyond the simulated one at p2p=0 is attributed to send/recv latency. PACI keeps only
    P-s micro-batches in flight, so on P=2 every p2p millisecond shows up on the critical path.
    """
    def sim(p2p: float) -> float:
        cs = [Costs(c.forward, c.backward, c.step, p2p) for c in stage_costs]
        return window_time(CANDIDATE, P, m, cs)

    lo, hi = 0.0, measured_ms
    if sim(lo) >= measured_ms:
        return 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sim(mid) < measured_ms else (lo, mid)
    return (lo + hi) / 2


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------
def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pair(xs: Sequence[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(x) for x in xs)


def stage_means(runs: Sequence[Run], attr: str, fmt: str = "{:.1f}") -> str:
    """Per-stage values of ``attr`` averaged over the rounds, as "s0 / s1"."""
    return pair([mean(x) for x in zip(*(getattr(r, attr) for r in runs), strict=True)], fmt)


def measured_section(runs: list[Run], args: argparse.Namespace) -> tuple[str, dict]:
    """The measured table plus, per M, the median PACI/flush ratio and its share of ideal."""
    rows, verdict = [], {}
    for m in args.micro_batches:
        ideal = (m + P - 1) / m
        flush = {r.round: r for r in runs if r.micro_batches == m and r.schedule == BASELINE}
        for s in SCHEDULES:
            mine = sorted((r for r in runs if r.micro_batches == m and r.schedule == s),
                          key=lambda r: r.round)  # fmt: skip
            ratios = [r.tokens_per_s / flush[r.round].tokens_per_s for r in mine]
            ratio = statistics.median(ratios)
            want = 1.0 if s == BASELINE else ideal
            if s == CANDIDATE:
                verdict[m] = (ratio, ideal, ratio / ideal)
            rows.append([
                str(m), s,
                pair([r.tokens_per_s for r in mine], "{:.0f}"),
                f"{statistics.median(r.tokens_per_s for r in mine):.0f}",
                pair(ratios), f"{want:.2f}", f"{ratio / want:.0%}",
                pair([r.other_cores for r in mine]),
                stage_means(mine, "bubble", "{:.2f}"), stage_means(mine, "rss_mb"),
                stage_means(mine, "f_ms"), stage_means(mine, "b_ms"), stage_means(mine, "s_ms"),
            ])  # fmt: skip
    head = ["M", "schedule", "tokens/s per round", "median tokens/s", "ratio vs flush per round",
            "ideal ratio", "of ideal (median)", "other load (cores) per round",
            "bubble s0 / s1", "peak RSS MB s0 / s1", "F ms s0 / s1", "B ms s0 / s1",
            "STEP ms s0 / s1"]  # fmt: skip
    return table(head, rows), verdict


def projection_section(runs: list[Run], args: argparse.Namespace) -> str:
    """Fit p2p on the measured PACI windows, then project P = 4 .. 32 with a uniform stage."""
    per_stage = []
    for s in range(P):
        f = mean([r.f_ms[s] for r in runs])
        b = mean([r.b_ms[s] for r in runs])
        # A flush STEP waits inside the global grad-norm all-reduce; only local steps count.
        st = mean([r.s_ms[s] for r in runs if not get_schedule(r.schedule).global_step])
        per_stage.append(Costs(f, b, st))
    fits = []
    check = []
    for m in args.micro_batches:
        paci_ms = statistics.median(r.ms_per_iter for r in runs
                                    if r.micro_batches == m and r.schedule == CANDIDATE)
        p2p = fit_p2p(per_stage, m, paci_ms)
        fits.append(p2p)
        flush_ms = statistics.median(r.ms_per_iter for r in runs
                                     if r.micro_batches == m and r.schedule == BASELINE)
        sim_flush = window_time(BASELINE, P, m,
                                [Costs(c.forward, c.backward, c.step, p2p) for c in per_stage])
        # What the measured stage imbalance and step cost alone allow (no p2p latency).
        best = (window_time(BASELINE, P, m, per_stage)
                / window_time(CANDIDATE, P, m, per_stage))
        check.append(f"M={m}: PACI window {paci_ms:.1f} ms measured -> p2p {p2p:.2f} ms; "
                     f"flush window {flush_ms:.1f} ms measured, {sim_flush:.1f} ms simulated "
                     f"with that p2p; with the measured per-stage costs and p2p=0 the best "
                     f"PACI/flush is {best:.2f}")  # fmt: skip
    p2p = mean(fits)
    uni = Costs(mean([c.forward for c in per_stage]), mean([c.backward for c in per_stage]),
                mean([c.step for c in per_stage]), p2p)
    rows = []
    for stages in (P, *args.project_stages):
        for m in args.project_micro_batches:
            row = [str(stages), str(m), f"{(m + stages - 1) / m:.2f}"]
            for p in (0.0, p2p):
                cs = [Costs(uni.forward, uni.backward, uni.step, p)] * stages
                t = {}
                for s in SCHEDULES:
                    try:
                        t[s] = window_time(s, stages, m, cs)
                    except ValueError:  # 2BW needs m >= P-1
                        t[s] = float("nan")
                busy = m * (uni.forward + uni.backward) + uni.step
                if p == p2p:
                    row += [f"{1 - busy / t[s]:.2f}" if t[s] == t[s] else "-" for s in SCHEDULES]
                row += [f"{t[BASELINE] / t[s]:.2f}" if t[s] == t[s] else "-"
                        for s in SCHEDULES if s != BASELINE]
            rows.append(row)
    head = ["P", "M", "ideal", "2bw/flush p2p=0", "paci/flush p2p=0",
            "bubble flush", "bubble 2bw", "bubble paci", "2bw/flush", "paci/flush"]
    intro = (
        "Projection from the P=2 costs above, not a measurement. Every stage is assumed to "
        f"cost the measured mean stage: F {uni.forward:.1f} ms, B {uni.backward:.1f} ms, "
        f"local STEP {uni.step:.1f} ms per action; p2p {p2p:.2f} ms per hop is fitted so that "
        "the simulated P=2 PACI window matches the measured one (" + "; ".join(check) + "), "
        "so it holds everything outside F/B/STEP on the critical path: gloo send/recv, data "
        "loading, Python between actions, and time lost to other processes on the cores. "
        "Columns without 'p2p=0' use the fitted p2p. Bubble is the steady-state idle share "
        "(fill and drain of the whole run excluded); ratios are steady-state throughput "
        "relative to 1F1B-flush; ideal is (M+P-1)/M. 2BW needs M >= P-1 ('-' otherwise); PACI "
        "with M < P-1 runs but its weights may cross more than one update."
    )
    return intro + "\n\n" + table(head, rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="iterations left out of the timing")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4], help="values of M")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--split", default="3,1", help="layers per stage; stage 1 also holds the head")
    p.add_argument("--project-stages", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--project-micro-batches", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--output", help="write the markdown report here (default: print only)")
    p.add_argument("--fresh-data", action="store_true",
                   help="build the small dataset even when data/quickstart exists")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories")
    args = p.parse_args(argv)

    t0, load0 = time.time(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_schedules_"))
    try:
        data = ensure_data(work, args.fresh_data)
        runs = []
        for m in args.micro_batches:
            for rnd in range(1, args.rounds + 1):
                for s in SCHEDULES:
                    r = train_once(args, s, m, rnd, data, work)
                    print(f"M={m} round {rnd} {s:14s} {r.tokens_per_s:8.0f} tokens/s "
                          f"{r.ms_per_iter:7.1f} ms/iter, other load {r.other_cores:.2f} cores",
                          flush=True)
                    runs.append(r)
    finally:
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"run directories kept in {work}")

    measured, verdict = measured_section(runs, args)
    lines = [
        f"P={P}, {args.config} with num_layers={args.num_layers}, layers per stage "
        f"[{args.split}], micro-batch size {args.micro_batch_size}, {args.iters} iterations "
        f"(first {args.warmup} left out), {args.rounds} interleaved rounds, one thread per "
        "process. Tokens/s is the median over iterations; ratios are taken against the flush "
        "run of the same round. Bubble, RSS and action times are per stage, averaged over "
        "rounds; a flush STEP starts after a pipeline barrier, so waiting for the slowest "
        "stage counts as idle. 'Other load' is the CPU that processes outside the run used "
        "meanwhile, in cores out of 2: "
        "rounds well above 0 were disturbed.",
        "",
        measured,
        "",
    ]
    for m, (ratio, ideal, frac) in verdict.items():
        ok = "reaches" if frac >= 0.9 else "misses"
        lines.append(f"- M={m}: PACI/flush {ratio:.2f} of ideal {ideal:.2f} = {frac:.0%}, "
                     f"{ok} the 90% target.")
    lines += ["", projection_section(runs, args), "",
              f"Benchmark wall time: {time.time() - t0:.0f} s; 1-minute load average "
              f"{load0:.2f} before, {os.getloadavg()[0]:.2f} after (2 = both cores busy)."]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.output:
        Path(args.output).write_text(report)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
