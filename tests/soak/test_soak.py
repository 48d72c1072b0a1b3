"""Long-run soak: 2,000 iterations of PACI on 2 pipeline stages through the real CLI.

Run A trains uninterrupted while a sampler reads each worker's resident memory
(``/proc/PID/status`` VmRSS) once a second. Run B is the same command, SIGKILLed at
three seeded random iterations (a rank-0 worker, a rank-1 worker, the whole torchrun
tree, in a seeded order) and relaunched each time; every relaunch must resume from the
newest complete checkpoint on disk. B must end with A's per-iteration losses (and
learning rates, gradient norms and consumed samples) bit for bit, and with the same
tensors in every checkpoint. A's memory must stay flat after the first checkpoint
window.

Out of the default run (``-m "not soak"`` in pyproject's addopts); run it with
``python3 -m pytest -m soak tests/soak -q -s`` (about 10 minutes on 2 cores; ``-s``
shows the summary it prints). ``SOAK_ITERS`` and ``SOAK_SEED`` change the length and
the kill points (probing only; the recorded run uses the defaults).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERS = int(os.environ.get("SOAK_ITERS", "2000"))
SEED = int(os.environ.get("SOAK_SEED", "2000"))
INTERVAL = 100  # checkpoint.interval
KILLS = ("worker rank 0", "worker rank 1", "torchrun tree")
RSS_GROWTH_MB = 20.0  # allowed growth of a worker's RSS after the first window
VOCAB = 200

pytestmark = pytest.mark.soak


def make_dataset(directory: str) -> str:
    """Random token documents: the soak tests resumption and memory, not learning."""
    from megatron_paci.data.indexed_dataset import IndexedDatasetBuilder

    prefix = os.path.join(directory, "synthetic")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(256):
        builder.add_document(rng.integers(0, VOCAB - 1, size=int(rng.integers(20, 200))))
    builder.finalize(prefix + ".idx")
    return prefix


def command(prefix: str, run_dir: str) -> list[str]:
    torchrun = shutil.which("torchrun") or None
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    overrides = {
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.seq_length": 32, "model.dropout": 0.0, "model.attention_dropout": 0.0,
        "model.make_vocab_size_divisible_by": 64, "data.path": f"[{prefix}]",
        "data.tokenizer": f"null:{VOCAB}", "train.micro_batch_size": 2,
        "train.global_batch_size": 8, "train.iters": ITERS, "train.eval_interval": 0,
        "train.precision": "fp32", "train.device": "cpu", "train.sample_tokens": 0,
        "optim.lr": 3e-3, "optim.lr_warmup_iters": 20, "optim.clip_grad": 1.0,
        "parallel.pipeline": 2, "pipeline.schedule": "paci",
        "checkpoint.interval": INTERVAL, "logging.interval": 1, "logging.plot": False,
        "run.dir": run_dir,
    }
    return [*launcher, "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "pretrain_gpt.py"), *(f"{k}={v}" for k, v in overrides.items())]


# --- processes -------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    children, found, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the training processes below ``proc`` (torchrun's agent
    starts them with RANK in their environment)."""
    out = {}
    for pid in descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"RANK" in env and b"pretrain_gpt.py" in cmd:
            out[int(env[b"RANK"])] = pid
    return out


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def last_iteration(run_dir: str) -> int:
    """The newest iteration with a loss row in metrics.jsonl (0 before the first)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(tail):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the first (cut) line of the tail, or a row being written
        if "loss" in row:
            return int(row["iteration"])
    return 0


def launch(cmd: list[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    log = open(log_path, "a")  # noqa: SIM115 (closed by the caller through proc.log)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


@contextlib.contextmanager
def running(cmd: list[str], log_path: str) -> Iterator[subprocess.Popen]:
    """A launch whose processes are all killed if the test fails while it runs."""
    proc = launch(cmd, log_path)
    try:
        yield proc
    finally:
        if proc.poll() is None or any(not _zombie(p) for p in descendants(proc.pid)):
            for pid in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(30)
        proc.log.close()  # type: ignore[attr-defined]


def reap(proc: subprocess.Popen, tree: list[int], timeout: float) -> float:
    """Wait until ``proc`` and every process of ``tree`` are gone; seconds it took.
    Fails (after killing what is left) if they outlive ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        proc.poll()
        alive = [p for p in tree if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        if proc.returncode is not None and not alive:
            return time.monotonic() - start
        time.sleep(0.1)
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)
    pytest.fail(f"after a kill, processes {tree} of the run were still alive after "
                f"{timeout:.0f} s (a hang)")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# --- reading the runs --------------------------------------------------------------------


def loss_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def complete_checkpoints(run_dir: str) -> list[int]:
    """Iterations of the checkpoint directories a save finished (renamed from
    ``iter_N.partial``, with DCP's ``.metadata`` inside)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root)
                  if (m := re.fullmatch(r"iter_(\d+)", name))
                  and os.path.isfile(os.path.join(root, name, ".metadata")))


def checkpoint_state(run_dir: str, iteration: int, scratch: str) -> tuple[dict, dict]:
    """Every tensor DCP stored in the checkpoint (model, Adam state, each rank's RNG),
    and its meta.json."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = os.path.join(run_dir, "checkpoints", f"iter_{iteration:07d}")
    out = os.path.join(scratch, f"{os.path.basename(run_dir)}_{iteration}.pt")
    dcp_to_torch_save(path, out)
    state = torch.load(out, weights_only=True)
    os.remove(out)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)  # (config.yaml names each run's own run.dir)
    return flatten(state), meta


def bits(value) -> tuple:
    """A tensor as dtype, shape and bytes: equal only when bit for bit (NaN included:
    an RNG state with no cached Gaussian stores one)."""
    if not isinstance(value, torch.Tensor):
        return (type(value).__name__, value)
    t = value.detach().contiguous()
    return (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): tree}


# --- the soak -----------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Once a second: (seconds, last logged iteration, {rank: VmRSS MB}) of the run."""

    def __init__(self, proc: subprocess.Popen, run_dir: str):
        super().__init__(daemon=True)
        self.proc, self.run_dir, self.samples = proc, run_dir, []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set() and self.proc.poll() is None:
            pids = workers(self.proc)
            rss = {rank: rss_mb(pid) for rank, pid in pids.items()}
            rss = {r: v for r, v in rss.items() if v is not None}
            if rss:
                self.samples.append((time.monotonic() - start, last_iteration(self.run_dir),
                                     rss))
            self.stop.wait(1.0)


def run_a(cmd: list[str], run_dir: str) -> tuple[float, list]:
    start = time.monotonic()
    with running(cmd, run_dir + ".log") as proc:
        sampler = RssSampler(proc, run_dir)
        sampler.start()
        rc = proc.wait(timeout=3600)
        sampler.stop.set()
        sampler.join()
    assert rc == 0, _tail(run_dir + ".log")
    return time.monotonic() - start, sampler.samples


def run_b(cmd: list[str], run_dir: str, kill_at: list[int], kinds: list[str]) -> dict:
    """Launch, SIGKILL once the log shows iteration ``kill_at[i]``, relaunch; the last
    launch runs to the end. Returns what happened at each kill and relaunch."""
    log_path = run_dir + ".log"
    events, start = [], time.monotonic()
    for i in range(len(kill_at) + 1):
        on_disk = complete_checkpoints(run_dir)
        mark = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        event: dict = {"launch": i + 1, "resume_expected": on_disk[-1] if on_disk else 0}
        with running(cmd, log_path) as proc:
            if i == len(kill_at):
                rc = proc.wait(timeout=3600)
                assert rc == 0, _tail(log_path)
            else:
                event.update(kill(proc, run_dir, kill_at[i], kinds[i], log_path))
        with open(log_path) as f:
            f.seek(mark)
            text = f.read()
        m = re.search(r"resumed from \S+ at iteration (\d+)", text)
        event["resumed_at"] = int(m.group(1)) if m else 0
        events.append(event)
    return {"events": events, "wall_s": time.monotonic() - start}


def kill(proc: subprocess.Popen, run_dir: str, at: int, kind: str, log_path: str) -> dict:
    """SIGKILL ``kind`` once metrics.jsonl reaches iteration ``at``; wait for the rest of
    the run to go (torchrun tears down the other worker)."""
    while (seen := last_iteration(run_dir)) < at:
        if proc.poll() is not None:
            pytest.fail(f"a launch exited ({proc.returncode}) at iteration {seen}, before its "
                        f"kill at {at}\n" + _tail(log_path))
        time.sleep(0.02)
    pids, tree = workers(proc), descendants(proc.pid)
    targets = {"worker rank 0": [pids[0]], "worker rank 1": [pids[1]],
               "torchrun tree": [proc.pid, *tree]}[kind]
    for pid in targets:
        os.kill(pid, signal.SIGKILL)
    teardown = reap(proc, tree, timeout=120)
    return {"kill": kind, "kill_after_iteration": seen, "teardown_s": round(teardown, 1),
            "exit_code": proc.returncode, "last_logged": last_iteration(run_dir)}


def _tail(path: str, n: int = 40) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def rss_summary(samples: list) -> dict[int, dict[str, float]]:
    """Per rank: RSS at the first sample after the first window (iteration > INTERVAL),
    the largest after it, the last, and a least-squares slope in MB per 1000 iterations."""
    out = {}
    for rank in sorted({r for _, _, rss in samples for r in rss}):
        pts = [(it, rss[rank]) for _, it, rss in samples if rank in rss]
        after = [(it, v) for it, v in pts if it > INTERVAL]
        its = np.array([it for it, _ in after], dtype=float)
        vals = np.array([v for _, v in after])
        slope = float(np.polyfit(its, vals, 1)[0] * 1000) if len(after) > 2 else 0.0
        out[rank] = {"first_window_max": max(v for it, v in pts if it <= INTERVAL),
                     "baseline": after[0][1], "baseline_iteration": after[0][0],
                     "max_after": float(vals.max()), "last": after[-1][1],
                     "last_iteration": after[-1][0], "samples": len(pts),
                     "slope_mb_per_1000": slope}
    return out


def rss_by_iteration(samples: list, every: int) -> str:
    """The first sample at or after each multiple of ``every``, as 'iteration: r0/r1'."""
    out = []
    for target in range(every, ITERS + 1, every):
        hit = next(((it, rss) for _, it, rss in samples if it >= target and len(rss) == 2),
                   None)
        if hit:
            out.append(f"{hit[0]}: {hit[1][0]:.1f}/{hit[1][1]:.1f}")
    return ", ".join(out)


def test_soak_paci_two_stages_killed_three_times(tmp_path):
    prefix = make_dataset(str(tmp_path))
    rng = random.Random(SEED)
    kill_at = sorted(rng.sample(range(50, ITERS), len(KILLS)))
    kinds = rng.sample(KILLS, len(KILLS))
    print(f"\nsoak: {ITERS} iterations, checkpoint every {INTERVAL}, seed {SEED}, kills after "
          f"iterations {kill_at} ({', '.join(kinds)})")

    a_dir, b_dir = str(tmp_path / "a"), str(tmp_path / "b")
    a_wall, samples = run_a(command(prefix, a_dir), a_dir)
    print(f"run A: {a_wall:.0f} s")
    b = run_b(command(prefix, b_dir), b_dir, kill_at, kinds)
    print(f"run B: {b['wall_s']:.0f} s")
    for e in b["events"]:
        print("  ", e)

    # Every relaunch resumed from the newest complete checkpoint it found.
    for e in b["events"]:
        assert e["resumed_at"] == e["resume_expected"], e
    for e, after in zip(b["events"][1:], b["events"][:-1], strict=True):
        # ... which is the last multiple of INTERVAL logged, or the one before it when
        # the kill came during that save.
        newest = after["last_logged"] // INTERVAL * INTERVAL
        assert e["resumed_at"] in (newest, newest - INTERVAL), (after, e)

    # Bit for bit: every iteration's loss, LR, gradient norm and consumed samples.
    keys = ("iteration", "loss", "lr", "grad_norm", "consumed_samples", "skipped_iters")
    rows_a = [tuple(r[k] for k in keys) for r in loss_rows(a_dir)]
    rows_b = [tuple(r[k] for k in keys) for r in loss_rows(b_dir)]
    assert [r[0] for r in rows_a] == list(range(1, ITERS + 1))
    assert [r[0] for r in rows_b] == list(range(1, ITERS + 1))
    diff = [(ra, rb) for ra, rb in zip(rows_a, rows_b, strict=True) if ra != rb]
    assert not diff, f"{len(diff)} iterations differ, first: {diff[:3]}"
    assert rows_a[-1][4] == ITERS * 8

    # Every checkpoint's tensors (weights, Adam moments, RNG states) and meta.json agree.
    saved = list(range(INTERVAL, ITERS + 1, INTERVAL))
    assert complete_checkpoints(a_dir) == saved
    assert complete_checkpoints(b_dir) == saved
    for it in saved:
        ta, ma = checkpoint_state(a_dir, it, str(tmp_path))
        tb, mb = checkpoint_state(b_dir, it, str(tmp_path))
        assert sorted(ta) == sorted(tb), it
        assert any("optim" in k for k in ta) and any("weight" in k for k in ta), sorted(ta)
        for k in ta:
            va, vb = ta[k], tb[k]
            assert bits(va) == bits(vb), (it, k)
        assert ma == mb, it
    assert ma["iteration"] == ITERS and ma["consumed_samples"] == ITERS * 8, ma

    # Memory: flat after the first window.
    rss = rss_summary(samples)
    print("RSS (MB) per rank:", json.dumps(rss, indent=1))
    print("RSS (MB) rank 0 / rank 1 by iteration:", rss_by_iteration(samples, 200))
    assert sorted(rss) == [0, 1]
    for rank, r in rss.items():
        assert r["last_iteration"] >= ITERS - 2 * INTERVAL, (rank, r)  # sampled to the end
        assert r["max_after"] - r["baseline"] < RSS_GROWTH_MB, (rank, r)
