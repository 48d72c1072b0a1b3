"""Spawn N gloo processes on 127.0.0.1 with a free port; the one helper every
distributed test uses.

    results = spawn(worker, world_size=2, args=(a, b))

``worker(rank, world_size, *args)`` runs in its own process with one torch
thread, ``RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT`` set and the default gloo
group initialised; its return value (picklable) comes back in rank order. A
worker that raises fails the test with its traceback; a hang is killed after
``timeout`` seconds, so no test leaves processes behind.

Processes come from a fork server that has imported torch and this package once
(``_PRELOAD``): a fresh interpreter per rank spends seconds of CPU importing them,
which over the suite's few hundred ranks was a quarter of its time on two cores.
The server forks from a clean single-threaded process (never from pytest's), and
each rank takes the test's current environment and its stdout/stderr (so ``capfd``
sees what ranks print), as a spawned one would.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(obj: Any) -> Any:
    """Tensors become numpy arrays: a tensor sent through a Queue lives in the
    child's shared memory and hangs the parent once the child exits."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().float().numpy().copy() if obj.dtype == torch.bfloat16 \
            else obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


# Imported once in the fork server; nothing in them reads the environment at import
# except triton (not imported here), so a rank still sees its test's environment.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "numpy",
            "megatron_paci.training.trainer", "megatron_paci.pipeline.executor"]


class _Fd:
    """This process's file descriptor, duplicated into the rank (through the fork server)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(dup) -> int:
    return dup.detach()


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _entry(fn, rank, world_size, port, args, queue, init_group, pg_timeout, environ, fds):
    for target, fd in zip((1, 2), fds, strict=True):  # the test's stdout and stderr
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
        return
    queue.put((rank, "ok", _plain(result)))
    if dist.is_initialized():
        # A barrier before destroy avoids gloo aborts at exit; it fails (and is
        # ignored) when a test killed a peer on purpose.
        try:
            dist.barrier()
            dist.destroy_process_group()
        except RuntimeError:
            pass


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 120.0,
          init_group: bool = True, pg_timeout: float = 60.0,
          allow_failures: bool = False) -> list[Any]:
    """Run ``fn`` on ``world_size`` ranks; returns per-rank results in rank order.

    With ``allow_failures`` a worker's exception text is returned as its result
    (tests of failure handling), and exit codes are not checked.
    """
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue,
                                              init_group, pg_timeout, dict(os.environ),
                                              [_Fd(1), _Fd(2)]),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) + len(errors) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise TimeoutError(f"distributed test did not finish in {timeout}s; "
                                   f"finished ranks: {sorted(results) + sorted(errors)}")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: check whether someone died silently
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in results and r not in errors]
                for r in dead:
                    errors[r] = f"rank {r} died with exit code {procs[r].exitcode}"
                continue
            (results if status == "ok" else errors)[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors and not allow_failures:
        # Every failing rank: the first to fail is often not the lowest rank.
        report = "\n".join(f"--- rank {r} failed:\n{errors[r]}" for r in sorted(errors))
        raise AssertionError(report)
    return [results.get(r, errors.get(r)) for r in range(world_size)]
