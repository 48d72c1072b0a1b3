"""A rank killed or frozen (in a forward, inside a collective, during a save) makes
every other rank stop within parallel.timeout_s with a message naming it and the
operation that was waiting; relaunching resumes with no sample skipped or repeated."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time

from launcher import spawn
from parallel_equality import config, losses, make_dataset

TIMEOUT_S = 8  # parallel.timeout_s: heartbeats every 1 s


def _killed_in_forward(rank, world, prefix, run_dir):
    from megatron_paci.parallel.state import initialize
    from megatron_paci.training.trainer import Trainer

    cfg = config(prefix, run_dir, 6, **{"parallel.pipeline": 2,
                                        "parallel.timeout_s": TIMEOUT_S})
    trainer = Trainer(cfg, initialize(1, 2, timeout_s=TIMEOUT_S))
    if rank == 1:
        calls = {"n": 0}

        def die(module, args, out):
            calls["n"] += 1
            if calls["n"] == 6:  # in the forward of micro-batch 6 (iteration 2)
                os._exit(17)

        trainer.model.register_forward_hook(die)
    start = time.monotonic()
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001 - the point is what it says
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None}


def test_a_rank_killed_in_a_forward_is_named(tmp_path):
    prefix = make_dataset(str(tmp_path))
    res = spawn(_killed_in_forward, 2, args=(prefix, str(tmp_path / "run")), timeout=90,
                allow_failures=True, init_group=False)
    assert "exit code 17" in res[1]
    err = res[0]["error"]
    assert err.startswith("stage 0 (rank 0) was running B"), err
    # gloo says "Read error ...: Connection reset by peer" or "Connection closed by peer"
    assert re.search(r"from stage 1 \(rank 1\): .*Connection (reset|closed) by peer", err), err
    assert "rank 1 (host " in err and "dead or frozen (last in: " in err, err
    assert res[0]["seconds"] < TIMEOUT_S


def _frozen_in_reduction(rank, world, prefix, run_dir):
    from megatron_paci.parallel.state import initialize
    from megatron_paci.training.trainer import Trainer

    cfg = config(prefix, run_dir, 6, **{"parallel.timeout_s": TIMEOUT_S})
    trainer = Trainer(cfg, initialize(1, 1, timeout_s=TIMEOUT_S))  # dp = 2
    if rank == 1:
        finish = trainer.optimizer.grad_buffer.finish_grad_sync
        calls = {"n": 0}

        def freeze():
            calls["n"] += 1
            if calls["n"] == 2:  # iteration 2: stop like a hung GPU, reaped later
                subprocess.Popen(["sh", "-c", f"sleep 12; kill -9 {os.getpid()}"])
                os.kill(os.getpid(), signal.SIGSTOP)
            finish()

        trainer.optimizer.grad_buffer.finish_grad_sync = freeze
    start = time.monotonic()
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None}


def test_a_rank_frozen_inside_a_collective_is_named(tmp_path):
    prefix = make_dataset(str(tmp_path))
    res = spawn(_frozen_in_reduction, 2, args=(prefix, str(tmp_path / "run")), timeout=90,
                allow_failures=True, init_group=False)
    err = res[0]["error"]
    # gloo words its timeout either way ("Timed out ...", "Application timeout caused
    # pair closure"), depending on which side of the pair notices first
    assert err.startswith("rank 0: ") and re.search(
        r" over the dp group \(ranks 0, 1\) failed: (Timed out|Application timeout)", err), err
    assert "rank 1 (host " in err and "dead or frozen (last in: " in err, err
    # gloo's timeout is parallel.timeout_s; the report adds no wait (the beat is old)
    assert TIMEOUT_S - 1 < res[0]["seconds"] < TIMEOUT_S + 5, res[0]


def _launch(rank, world, argv, dying_write=0):
    """pretrain_gpt as torchrun would run it; rank 1 dies at its ``dying_write``-th
    checkpoint write (0: never)."""
    from torch.distributed.checkpoint import filesystem

    import pretrain_gpt

    if rank == 1 and dying_write:
        write = filesystem.FileSystemWriter.write_data
        calls = {"n": 0}

        def die(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == dying_write:
                os._exit(19)
            return write(self, *args, **kwargs)

        filesystem.FileSystemWriter.write_data = die
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pretrain_gpt.main(argv)
    return {"code": code, "stderr": err.getvalue()}


def _argv(prefix, run_dir, iters):
    cfg = config(prefix, run_dir, iters, **{
        "parallel.pipeline": 2, "pipeline.schedule": "paci", "parallel.timeout_s": TIMEOUT_S,
        "checkpoint.interval": 2, "checkpoint.load": True})
    return [f"{k}.{n}={v}" for k, section in cfg.to_dict().items()
            for n, v in section.items() if v is not None and not isinstance(v, (list, dict))] \
        + [f"data.path=[{prefix}]"]


def test_killed_during_a_save_is_named_and_the_relaunch_continues_exactly(tmp_path):
    prefix = make_dataset(str(tmp_path))
    run = str(tmp_path / "run")
    # Rank 1 dies writing the checkpoint of iteration 4 (iteration 2's is complete).
    first = spawn(_launch, 2, args=(_argv(prefix, run, 6), 2), timeout=120,
                  allow_failures=True, init_group=False)
    assert "exit code 19" in first[1]
    err = first[0]["stderr"]
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 (tp 0, dp 0, pp 0) stopped"), err
    assert "rank 1 (host " in lines[0] and "the checkpoint save at iteration 4" in lines[0], err
    again = spawn(_launch, 2, args=(_argv(prefix, run, 6),), timeout=120,
                  init_group=False)
    assert [r["code"] for r in again] == [0, 0], again
    # The relaunch resumed from iteration 2 and logged 3..6; an uninterrupted run of the
    # same layout is the reference for samples and data order (bit-exact resume).
    ref = str(tmp_path / "ref")
    spawn(_launch, 2, args=(_argv(prefix, ref, 6),), timeout=120, init_group=False)
    assert losses(run) == losses(ref)
    rows = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r]
    assert [r["consumed_samples"] for r in rows] == [8 * i for i in range(1, 7)]
