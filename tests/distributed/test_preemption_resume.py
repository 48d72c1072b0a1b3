"""A stop signal saves at the next agreed drain, and the relaunch continues bit for bit.

Each schedule on 2 pipeline ranks: a run that gets a real SIGUSR1 on one rank at
iteration 3 stops at the drain of iteration 4 (train.exit_check_interval=2) with
EXIT_REQUEUE, and relaunched on the same run directory it ends with the losses of an
uninterrupted run, bit for bit; the other rank got no signal and stopped all the same.
"""

import os

from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

ITERS = 8


def _run(rank, world, prefix, root, schedule, signalled_rank, when="3", stop_at=4,
         extra=None):
    from megatron_paci.parallel.state import initialize
    from megatron_paci.training.preemption import EXIT_REQUEUE

    pstate = initialize(1, 2)

    def cfg(name):
        return config(prefix, os.path.join(root, name), ITERS, **{
            "model.num_layers": 4, "parallel.pipeline": 2, "pipeline.schedule": schedule,
            "train.exit_check_interval": 2, "checkpoint.load": True, "optim.lr": 3e-3,
            **(extra or {})})

    whole = train(cfg("whole"), pstate)
    os.environ["MEGATRON_PACI_TEST_SIGNAL"] = f"{when.split(':')[0]}:{signalled_rank}" + (
        ":save" if when.endswith(":save") else "")
    stopped = train(cfg("stopped"), pstate)
    del os.environ["MEGATRON_PACI_TEST_SIGNAL"]
    assert stopped.exit_code == EXIT_REQUEUE, stopped.exit_code
    assert stopped.progress.iteration == stop_at, stopped.progress.iteration
    from megatron_paci.checkpoint.format import list_checkpoints

    assert list_checkpoints(os.path.join(root, "stopped", "checkpoints"))[-1][0] == stop_at
    resumed = train(cfg("stopped"), pstate)
    assert resumed.exit_code == 0 and resumed.progress.iteration == ITERS
    if not whole.log_enabled:
        return None
    return losses(whole.cfg.run.dir), losses(resumed.cfg.run.dir)


def test_stop_signal_then_relaunch_equals_an_uninterrupted_run(tmp_path):
    prefix = make_dataset(str(tmp_path))
    for schedule, signalled in (("1f1b_flush", 0), ("pipedream_2bw", 1), ("paci", 0)):
        res = spawn(_run, 2, args=(prefix, str(tmp_path / schedule), schedule, signalled),
                    timeout=300)
        whole, resumed = next(r for r in res if r is not None)
        assert len(whole) == ITERS
        assert resumed == whole, (schedule, whole, resumed)  # bit for bit


def test_a_signal_during_a_save_lets_it_complete_then_stops(tmp_path):
    """SIGUSR1 on rank 1 while it writes the iteration-2 checkpoint (PACI): the save
    completes, the stop is agreed at that drain, and the relaunch continues exactly."""
    prefix = make_dataset(str(tmp_path))
    extra = {"checkpoint.interval": 2, "train.exit_check_interval": 0}
    res = spawn(_run, 2, args=(prefix, str(tmp_path / "paci"), "paci", 1, "2:save", 2, extra),
                timeout=300)
    whole, resumed = next(r for r in res if r is not None)
    assert resumed == whole
