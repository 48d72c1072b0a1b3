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


def test_a_second_sigterm_ends_the_process(tmp_path):
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "from megatron_paci.training.preemption import StopRequests\n"
            "s = StopRequests(); s.install()\n"
            "os.kill(os.getpid(), signal.SIGTERM); assert s.local_reason() == 2\n"
            "print('first caught', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('survived')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "first caught" and r.returncode == -signal.SIGTERM
