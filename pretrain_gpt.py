"""Pretrain a GPT: ``python pretrain_gpt.py --config configs/tiny.yaml [section.key=value ...]``.

``--dry-run [--world-size N] [--gpu-memory-gb G]`` prints the plan for N GPUs of G GiB
(training/plan.py) and exits: 0 when the layout fits, 1 when it does not, 2 when it
cannot run at all. It starts no process group and touches no GPU.

Thin on purpose: config -> layout -> build -> train. Under torchrun (or srun)
every rank runs this; relaunching the same command resumes from the newest
complete checkpoint in ``run.dir/checkpoints``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from megatron_paci.checkpoint.integrity import (
    CheckpointError,  # (no DCP import: --print stays fast)
)
from megatron_paci.config import ConfigError, format_config, parse_args
from megatron_paci.parallel import liveness
from megatron_paci.parallel.comm import CommError, peer_failure
from megatron_paci.parallel.state import (
    ParallelConfigError,
    fail_on_all_ranks,
    initialize,
    shutdown,
    world_from_env,
)
from megatron_paci.pipeline.executor import PipelineError
from megatron_paci.training.layout import validate_layout
from megatron_paci.training.numerics import TrainingDiverged
from megatron_paci.training.preemption import StopRequests
from megatron_paci.utils.host_memory import keep_freed_host_memory


def print_once(text: str) -> None:
    """Rank 0 prints (``--print`` under torchrun or srun runs on every rank); a closed
    pipe (``--print | head``) ends the output quietly instead of with a traceback."""
    if world_from_env()[0] != 0:
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _dry_run_flags(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The planner's flags, taken out before the config's own parser sees the rest."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true",
                   help="print the layout, memory per GPU, FLOPs and bubbles, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs to plan for (default: parallel.tensor x parallel.pipeline)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="memory of one GPU in GiB (default 80)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        print("dry-run " + p.format_help().strip() + "\n")
    return args, rest


def _dry_run(cfg, args: argparse.Namespace, source: str) -> int:
    from megatron_paci.training.plan import fits, format_plan, make_plan

    world = args.world_size or cfg.parallel.tensor * cfg.parallel.pipeline
    plan = make_plan(cfg, world, args.gpu_memory_gb)
    print(format_plan(plan, source), flush=True)
    return 0 if fits(plan) else 1


def _report_failure(e: BaseException, pstate) -> None:
    """This rank's ``error:`` line. A failed collective or pipeline receive already names
    the operation and the peers; anything else gets its traceback (it says where) and
    the peers' state. What a reader of 64 interleaved logs needs first."""
    names_peers = isinstance(e, (CommError, PipelineError))
    if not (names_peers or isinstance(e, CheckpointError)):
        traceback.print_exc()
    text = str(e).splitlines()[0] if str(e) else ""
    peers = "" if names_peers else liveness.explain()
    line = (f"rank {pstate.rank} (tp {pstate.tensor_rank}, dp {pstate.data_rank}, "
            f"pp {pstate.pipeline_rank}) stopped: {type(e).__name__}: {text}"
            + (f"; {peers}" if peers and peers != liveness.ALL_ALIVE else ""))
    liveness.record_failure(line)
    print(f"error: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    flags, argv = _dry_run_flags(argv)
    try:
        cfg, print_only = parse_args(argv)
        if flags.dry_run:
            source = argv[argv.index("--config") + 1] if "--config" in argv else ""
            return _dry_run(cfg, flags, source)
        if print_only:
            print_once(format_config(cfg))
            return 0
        validate_layout(cfg, world_from_env()[1])
    except (ConfigError, ParallelConfigError) as e:
        fail_on_all_ranks(str(e))
    # scripts/slurm/pretrain_gpt.sbatch asks slurm for SIGUSR1 minutes before the time
    # limit: from here on SIGTERM/SIGUSR1 only set a flag, and the trainer saves at the
    # next agreed drain and exits with EXIT_REQUEUE (training/preemption.py).
    stops = StopRequests(cfg.train.exit_duration_mins)
    stops.install()
    if cfg.train.device == "cpu":
        # Freed activations stay in the heap instead of coming back as page faults
        # (utils/host_memory.py).
        keep_freed_host_memory()
    try:
        # CPU training on a GPU node stays on gloo: no GPU per process needed.
        pstate = initialize(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.timeout_s,
                            backend="gloo" if cfg.train.device == "cpu" else None)
    except ParallelConfigError as e:
        fail_on_all_ranks(str(e))
    from megatron_paci.training.trainer import Trainer

    try:
        trainer = Trainer(cfg, pstate, stops=stops)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Bad input is seen identically by every rank; rank 0 reports it.
        fail_on_all_ranks(str(e))
    try:
        trainer.train()
    except CheckpointError as e:
        if peer_failure(str(e)):
            # A save that failed because a peer died or froze: each rank says so.
            _report_failure(e, pstate)
            return 1
        # A checkpoint that does not fit this run, a full disk: every rank reached the
        # same verdict.
        fail_on_all_ranks(str(e))
    except TrainingDiverged as e:
        # Too many skipped updates in a row: one line per stage that stopped (one for
        # the run when skips are decided globally); exit 1, a failure, not bad input.
        fail_on_all_ranks(str(e), code=1, speaks=e.report)
    except BaseException as e:
        # Not only Exception: torch.distributed.checkpoint's CheckpointException is a
        # BaseException, and a rank stopped by one still says so below.
        if isinstance(e, (SystemExit, KeyboardInterrupt)):
            raise
        _report_failure(e, pstate)
        return 1
    shutdown()
    # 0, or EXIT_REQUEUE (75) after saving for a preemption signal or a time limit:
    # the sbatch file requeues the job on it.
    return trainer.exit_code


if __name__ == "__main__":
    sys.exit(main())
