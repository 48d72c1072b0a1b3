"""Where each pipeline stage's wall time goes, on one clock for every stage.

Why: a stage's measured bubble (1 - compute / wall) lumps together three things that call
for different fixes: waiting because the neighbour had not sent yet (imbalance, or the
neighbour's own overhead), the transport (from the neighbour posting the send to the
receive completing), and the host work between actions (data loading, posting sends and
receives, the per-step callback). On one machine ``time.perf_counter`` reads one monotonic
clock in every process, so the k-th send on an edge pairs with the k-th receive there and
each wait splits at the moment the send was posted.

    python3 scripts/trace_stages.py --schedule paci --micro-batches 4
    python3 scripts/trace_stages.py --peer 1f1b --micro-batches 4

The model and the work per step are bench_peer.py's (``--shape small`` or ``compute``,
P=2, gloo, one thread per process). It wraps internals of one side for one run (the
project's executor and comm; torch.distributed.pipelining's stage and schedule functions)
and changes nothing that runs; the wrappers cost a few microseconds per call.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_peer  # noqa: E402

now = time.perf_counter


# --------------------------------------------------------------------------------------
# In a traced process: wrappers that append (tag, start, end[, peer]) to one list
# --------------------------------------------------------------------------------------
def _timed(owner: object, name: str, tag: str, log: list, peer_arg: int | None = None
           ) -> None:
    f = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = now()
        try:
            return f(*a, **k)
        finally:
            log.append((tag, t0, now(), a[peer_arg] if peer_arg is not None else -1))

    setattr(owner, name, wrapper)


def _dump_at_exit(log: list, out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    atexit.register(lambda: (out / f"trace_{rank}.json").write_text(json.dumps(log)))


def trace_project(out: Path, argv: list[str]) -> int:
    import runpy

    import torch.utils.data.dataloader as dl

    from megatron_paci.parallel import comm
    from megatron_paci.pipeline.executor import PipelineExecutor as Ex

    log: list = []
    # A post is logged at its call (posting is what the peer sees), a wait when it ends.
    for name in ("send", "recv"):
        _timed(comm, name, name, log, peer_arg=1)
    _timed(comm, "wait_recv", "wait", log, peer_arg=1)
    _timed(comm, "barrier", "barrier", log)
    _timed(dl._BaseDataLoaderIter, "__next__", "loader", log)
    _timed(Ex, "_send", "posting sends", log)
    _timed(Ex, "_post_recv", "posting receives", log)
    event = Ex._event

    def _event(self, kind, action, start):
        log.append((kind, start, now(), -1))  # the executor's own action marks
        return event(self, kind, action, start)

    Ex._event = _event
    segment = Ex.train_segment

    def train_segment(self, batches, first, count, on_step):
        def timed_step(*a):
            t0 = now()
            on_step(*a)
            log.append(("step callback", t0, now(), -1))
        return segment(self, batches, first, count, timed_step)

    Ex.train_segment = train_segment
    _dump_at_exit(log, out)
    sys.argv = [str(ROOT / "pretrain_gpt.py"), *argv]
    runpy.run_path(str(ROOT / "pretrain_gpt.py"), run_name="__main__")
    return 0


def trace_peer(out: Path, shape: str, m: int, iters: int, schedule: str) -> int:
    import torch
    import torch.distributed.pipelining.schedules as sch
    import torch.distributed.pipelining.stage as st

    log: list = []
    _timed(st._PipelineStageBase, "forward_one_chunk", "F", log)
    _timed(st._PipelineStageBase, "backward_one_chunk", "B", log)
    _timed(sch._PipelineSchedule, "_maybe_compute_loss", "loss", log)
    _timed(sch, "_batch_p2p", "posting p2p", log)
    _timed(sch, "_wait_batch_p2p", "wait", log)
    _timed(torch.optim.AdamW, "step", "S", log)
    _timed(torch.optim.AdamW, "zero_grad", "zero_grad", log)
    _dump_at_exit(log, out)
    bench_peer.pipelined_loop(bench_peer.SHAPES[shape], m, iters, schedule, None)
    return 0


# --------------------------------------------------------------------------------------
# The breakdown
# --------------------------------------------------------------------------------------
COMPUTE = ("F", "B", "S")


def _window(traces: Sequence[list], skip: float) -> tuple[float, float]:
    """The span every stage is in steady state: after each stage's first ``skip`` of its
    forwards, up to the end of the earliest-ending stage's last action."""
    starts, ends = [], []
    for log in traces:
        acts = [e for e in log if e[0] in COMPUTE]
        fwd = [e for e in acts if e[0] == "F"]
        starts.append(fwd[int(len(fwd) * skip)][1])
        ends.append(max(e[2] for e in acts))
    return max(starts), min(ends)


def pair_waits(traces: Sequence[list]) -> dict[int, list[tuple[float, float, float]]]:
    """Per rank: (wait start, wait end, the matching send's post time) for every receive.

    Messages between two ranks in one direction arrive in the order they were sent, and
    each rank waits for its receives from a peer in the order it posted them, so the k-th
    wait for ``src`` on ``dst`` is for the k-th send from ``src`` to ``dst``."""
    sends: dict[tuple[int, int], list[float]] = defaultdict(list)
    for src, log in enumerate(traces):
        for tag, t0, _, peer in log:
            if tag == "send":
                sends[(src, peer)].append(t0)
    paired: dict[int, list] = {}
    for dst, log in enumerate(traces):
        seen: dict[int, int] = defaultdict(int)
        out = []
        for tag, t0, t1, peer in log:
            if tag == "wait":
                out.append((t0, t1, sends[(peer, dst)][seen[peer]]))
                seen[peer] += 1
        paired[dst] = out
    return paired


def breakdown(traces: Sequence[list], skip: float = 0.2, paired: bool = True) -> list[dict]:
    """One row per stage: ms per iteration and the share of the steady-state window each
    kind of time takes. ``paired`` (the project): waits split into the neighbour being late
    and the transport; otherwise (the peer's batched ops) one wait column."""
    lo, hi = _window(traces, skip)
    span = hi - lo
    waits = pair_waits(traces) if paired else {}
    rows = []
    for rank, log in enumerate(traces):
        share: dict[str, float] = defaultdict(float)
        steps = 0
        for tag, t0, t1, _ in log:
            if t0 >= lo and t1 <= hi and tag not in ("send", "recv", "wait"):
                share[tag] += t1 - t0
                steps += tag == "S"
        if paired:
            for t0, t1, sent in waits[rank]:
                if t0 >= lo and t1 <= hi:
                    share["wait: neighbour late"] += max(0.0, min(sent, t1) - t0)
                    share["wait: transport"] += t1 - max(t0, sent)
        else:
            for tag, t0, t1, _ in log:
                if tag == "wait" and t0 >= lo and t1 <= hi:
                    share["wait"] += t1 - t0
        row = {k: v / span for k, v in share.items()}
        row["other"] = 1.0 - sum(row.values())
        row["ms per iteration"] = span / max(steps, 1) * 1e3
        row["compute ms per action"] = {
            k: statistics.median(t1 - t0 for tag, t0, t1, _ in log
                                 if tag == k and t0 >= lo and t1 <= hi) * 1e3
            for k in COMPUTE if any(e[0] == k for e in log)}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = sorted({k for r in rows for k in r if k not in ("ms per iteration",
                                                            "compute ms per action")},
                  key=lambda k: (k not in COMPUTE, k == "other", k))
    lines = ["| stage | ms/iter | " + " | ".join(cols) + " | median ms per F / B / S |",
             "|---" * (len(cols) + 3) + "|"]
    for s, r in enumerate(rows):
        ms = r["compute ms per action"]
        lines.append(f"| {s} | {r['ms per iteration']:.1f} | "
                     + " | ".join(f"{100 * r.get(c, 0.0):.1f}%" for c in cols)
                     + " | " + " / ".join(f"{ms.get(k, 0):.2f}" for k in COMPUTE) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------
def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    side = p.add_mutually_exclusive_group()
    side.add_argument("--schedule", default="paci", help="the project's pipeline.schedule")
    side.add_argument("--peer", choices=["gpipe", "1f1b"],
                      help="trace torch.distributed.pipelining's schedule instead")
    p.add_argument("--shape", choices=sorted(bench_peer.SHAPES), default="small")
    p.add_argument("--micro-batches", type=int, default=4, help="M per iteration")
    p.add_argument("--iters", type=int, default=120)
    p.add_argument("--skip", type=float, default=0.2,
                   help="the fraction of each stage's forwards left out as warm-up")
    p.add_argument("--output", help="also write the table to this file")
    p.add_argument("--trace-dir", help="keep each rank's trace_RANK.json (and the run) here; "
                   "by default a temporary folder, removed at the end")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def launch(args: argparse.Namespace, work: Path) -> list[str]:
    s = bench_peer.SHAPES[args.shape]
    me = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
          str(bench_peer.P), str(Path(__file__).resolve())]
    if args.peer:
        return me + ["--shape", args.shape, "--micro-batches", str(args.micro_batches),
                     "--iters", str(args.iters), "--peer", args.peer,
                     "--worker", "peer", str(work)]
    tokens = max(200_000, 2 * args.iters * args.micro_batches * s.micro_batch * (s.seq + 1))
    data = bench_peer.make_dataset(work, s, tokens)
    config = bench_peer.Config("traced", "project", bench_peer.P, args.schedule)
    overrides = bench_peer.project_overrides(config, s, args.micro_batches, args.iters, data,
                                             work / "run")
    return me + ["--worker", "project", str(work), "--", "--config", "configs/tiny.yaml",
                 *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        kind, out = args.worker[0], Path(args.worker[1])
        if kind == "peer":
            return trace_peer(out, args.shape, args.micro_batches, args.iters, args.peer)
        return trace_project(out, [a for a in args.rest if a != "--"])
    work = Path(args.trace_dir or tempfile.mkdtemp(prefix="trace_stages_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return trace(args, work)
    finally:
        if not args.trace_dir:
            shutil.rmtree(work, ignore_errors=True)


def trace(args: argparse.Namespace, work: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = launch(args, work)
    print(f"tracing {'the peer ' + args.peer if args.peer else args.schedule} (shape "
          f"{args.shape}, M={args.micro_batches}, {args.iters} iterations)", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        print(f"error: the traced run exited with {done.returncode}", file=sys.stderr)
        return 1
    traces = [json.loads((work / f"trace_{r}.json").read_text()) for r in range(bench_peer.P)]
    text = table(breakdown(traces, args.skip, paired=not args.peer))
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
