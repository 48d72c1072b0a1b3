"""Stop requests: signals and the time limit set a reason; wandb keeps one run id."""

import os
import signal

from megatron_paci.training.metrics import wandb_run_id
from megatron_paci.training.preemption import StopRequests


def test_a_signal_sets_the_reason_and_the_time_limit_too():
    stops = StopRequests()
    stops.install()
    try:
        assert stops.local_reason() == 0
        os.kill(os.getpid(), signal.SIGTERM)  # caught: the process goes on
        assert stops.local_reason() == 2
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    late = StopRequests(duration_mins=1e-9)
    assert late.local_reason() == 1 and StopRequests(duration_mins=0).local_reason() == 0


def test_wandb_run_id_is_made_once_per_run_directory(tmp_path):
    first = wandb_run_id(str(tmp_path / "run"))
    assert wandb_run_id(str(tmp_path / "run")) == first  # a relaunch continues it
    assert wandb_run_id(str(tmp_path / "other")) != first
