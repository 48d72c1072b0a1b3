"""A stop signal saves at the next agreed drain, and the relaunch continues bit for bit.

Each schedule on 2 pipeline ranks: a run that gets a real SIGUSR1 on one rank at
iteration 3 stops at the drain of iteration 4 (train.exit_check_interval=2) with
EXIT_REQUEUE, and relaunched on the same run directory it ends with the losses of an
uninterrupted run, bit for bit; the other rank got no signal and stopped all the same.
A signal inside a save lets the save complete and stops at that drain.
"""

import os

from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

ITERS = 8
CASES = [  # (name, schedule, signalled rank, signal spec, stop iteration, extra overrides)
    ("flush", "1f1b_flush", 0, "3", 4, {}),
    ("2bw", "pipedream_2bw", 1, "3", 4, {}),
    ("paci", "paci", 0, "3", 4, {}),
    ("paci_in_save", "paci", 1, "2:save", 2,
     {"checkpoint.interval": 2, "train.exit_check_interval": 0}),
]


def _run(rank, world, prefix, root):
    from megatron_paci.checkpoint.format import list_checkpoints
    from megatron_paci.parallel.state import initialize
    from megatron_paci.training.preemption import EXIT_REQUEUE

    pstate = initialize(1, 2)
    out = {}
    for name, schedule, signalled, when, stop_at, extra in CASES:
        def cfg(run, schedule=schedule, extra=extra, name=name):
            return config(prefix, os.path.join(root, name, run), ITERS, **{
                "model.num_layers": 4, "parallel.pipeline": 2, "pipeline.schedule": schedule,
                "train.exit_check_interval": 2, "checkpoint.load": True, "optim.lr": 3e-3,
                **extra})

        whole = train(cfg("whole"), pstate)
        at, _, place = when.partition(":")
        os.environ["MEGATRON_PACI_TEST_SIGNAL"] = f"{at}:{signalled}" + (
            f":{place}" if place else "")
        stopped = train(cfg("stopped"), pstate)
        del os.environ["MEGATRON_PACI_TEST_SIGNAL"]
        assert stopped.exit_code == EXIT_REQUEUE, (name, stopped.exit_code)
        assert stopped.progress.iteration == stop_at, (name, stopped.progress.iteration)
        saved = list_checkpoints(os.path.join(root, name, "stopped", "checkpoints"))
        assert saved[-1][0] == stop_at, (name, saved)
        resumed = train(cfg("stopped"), pstate)
        assert resumed.exit_code == 0 and resumed.progress.iteration == ITERS
        if whole.log_enabled:
            out[name] = (losses(whole.cfg.run.dir), losses(resumed.cfg.run.dir))
    return out


def test_stop_signal_then_relaunch_equals_an_uninterrupted_run(tmp_path):
    prefix = make_dataset(str(tmp_path))
    res = spawn(_run, 2, args=(prefix, str(tmp_path)), timeout=400)
    logged = next(r for r in res if r)
    assert sorted(logged) == sorted(name for name, *_ in CASES)
    for name, (whole, resumed) in logged.items():
        assert len(whole) == ITERS
        assert resumed == whole, (name, whole, resumed)  # bit for bit
