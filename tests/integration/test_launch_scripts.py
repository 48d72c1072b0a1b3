"""The launch scripts without slurm or GPUs: stand-ins for torchrun, srun and scontrol
on PATH record how they were called (argv, the rendezvous environment) and exit with
a chosen code; real torchrun runs where its output is what is being checked."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_overrides

from megatron_paci.training.exit_codes import EXIT_REQUEUE

SBATCH = os.path.join(ROOT, "scripts", "slurm", "pretrain_gpt.sbatch")
RECORDED_ENV = ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID", "RUN_DIR")

# argv and environment of each call, one JSON line; exit with $FAKE_RC_<NAME> (default 0).
# scontrol's `show hostnames` prints $FAKE_HOSTS.
FAKE = f"""#!{sys.executable}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"name": name, "argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {{k: os.environ.get(k) for k in {RECORDED_ENV!r}}}}}) + "\\n")
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print(os.environ.get("FAKE_HOSTS", ""))
sys.exit(int(os.environ.get("FAKE_RC_" + name.upper(), "0")))
"""

JOB = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "gpt", "SLURM_JOB_NODELIST": "node[07-08]",
       "SLURM_SUBMIT_DIR": ROOT, "FAKE_HOSTS": "node07\nnode08"}
PORT = "23456"  # 20000 + 123456 % 20000


@pytest.fixture
def fakes(tmp_path):
    """Runs a command with the stand-ins first on PATH; returns (result, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("torchrun", "srun", "scontrol"):
        path = bin_dir / name
        path.write_text(FAKE)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.jsonl"

    def call(argv, env=None):
        full = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "MASTER_", "NPROC", "RUN_DIR", "CONFIG"))}
        full.update({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                     "FAKE_LOG": str(log), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
                     "NPROC": "2", **(env or {})})
        if log.exists():
            log.unlink()
        r = subprocess.run(argv, cwd=str(tmp_path), env=full, capture_output=True, text=True,
                           timeout=120)
        calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        return r, calls

    return call


def only(calls, name):
    found = [c for c in calls if c["name"] == name]
    assert len(found) == 1, calls
    return found[0]


def test_size_script_runs_torchrun_on_one_node(fakes):
    r, calls = fakes(["bash", f"{ROOT}/scripts/pretrain_gpt2_medium.sh", "train.iters=7",
                      "parallel.tensor=2"], env={"NPROC": "4"})
    assert r.returncode == 0, r.stderr
    assert [c["name"] for c in calls] == ["torchrun"]
    assert calls[0]["argv"] == ["--standalone", "--nproc_per_node", "4", "pretrain_gpt.py",
                                "--config", "configs/gpt2_medium.yaml", "train.iters=7",
                                "parallel.tensor=2"]
    assert calls[0]["cwd"] == ROOT


def test_torchrun_worker_exit_code_passes_through(fakes):
    r, _ = fakes(["bash", f"{ROOT}/scripts/pretrain_tiny.sh"], env={"FAKE_RC_TORCHRUN": "3"})
    assert r.returncode == 3


def test_size_script_in_a_slurm_allocation_runs_srun_tasks(fakes):
    r, calls = fakes(["bash", f"{ROOT}/scripts/pretrain_gpt2_small.sh", "train.iters=7"],
                     env={**JOB, "NPROC": ""})
    assert r.returncode == 0, r.stderr
    assert "torchrun" not in [c["name"] for c in calls]
    srun = only(calls, "srun")
    assert srun["argv"] == ["python", "pretrain_gpt.py", "--config", "configs/gpt2_small.yaml",
                            "train.iters=7"]
    assert srun["env"]["MASTER_ADDR"] == "node07" and srun["env"]["MASTER_PORT"] == PORT
    assert only(calls, "scontrol")["argv"] == ["show", "hostnames", "node[07-08]"]
    # NPROC inside an allocation: tasks per node
    r, calls = fakes(["bash", f"{ROOT}/scripts/pretrain_tiny.sh"], env={**JOB, "NPROC": "8"})
    assert only(calls, "srun")["argv"][:3] == ["--ntasks-per-node", "8", "python"]


def test_print_runs_one_plain_process(fakes):
    r, calls = fakes(["bash", f"{ROOT}/scripts/pretrain_tiny.sh", "--print",
                      "train.iters=7"])
    assert r.returncode == 0, r.stderr
    assert calls == []  # neither torchrun nor srun
    assert r.stdout.count("end of arguments") == 1
    assert re.search(r"train\.iters \.+ 7$", r.stdout, re.M)


def test_sbatch_run_dir_port_and_host_from_the_job(fakes):
    r, calls = fakes(["bash", SBATCH, "configs/tiny.yaml", "train.iters=7", "optim.lr=1e-3"],
                     env=JOB)
    assert r.returncode == 0, r.stderr
    srun = only(calls, "srun")  # NPROC=2 of the caller's shell is not passed on
    assert srun["argv"] == ["python", "pretrain_gpt.py", "--config", "configs/tiny.yaml",
                            "run.dir=runs/gpt_123456", "train.iters=7", "optim.lr=1e-3"]
    assert srun["cwd"] == ROOT  # SLURM_SUBMIT_DIR
    assert srun["env"]["MASTER_ADDR"] == "node07" and srun["env"]["MASTER_PORT"] == PORT
    assert [c["argv"][0] for c in calls if c["name"] == "scontrol"] == ["show"]  # no requeue


def test_sbatch_config_and_run_dir_from_the_environment(fakes):
    r, calls = fakes(["bash", SBATCH, "train.iters=7"],
                     env={**JOB, "CONFIG": "configs/gpt2_small.yaml", "RUN_DIR": "/ckpt/a",
                          "SLURM_JOB_ID": "40000"})
    assert r.returncode == 0, r.stderr
    srun = only(calls, "srun")
    assert srun["argv"][2:] == ["--config", "configs/gpt2_small.yaml", "run.dir=/ckpt/a",
                                "train.iters=7"]
    assert srun["env"]["MASTER_PORT"] == "20000"  # 40000 % 20000 == 0


def test_sbatch_without_a_config_says_how_to_submit(fakes):
    r, calls = fakes(["bash", SBATCH, "train.iters=7"], env=JOB)
    assert r.returncode != 0
    assert "usage: sbatch scripts/slurm/pretrain_gpt.sbatch CONFIG" in r.stderr
    assert calls == []


@pytest.mark.parametrize("env", [{"FAKE_HOSTS": ""}, {"FAKE_RC_SCONTROL": "1"}],
                         ids=["no-host", "scontrol-fails"])
def test_sbatch_fails_loudly_without_a_rendezvous_host(fakes, env):
    r, calls = fakes(["bash", SBATCH, "configs/tiny.yaml"], env={**JOB, **env})
    assert r.returncode != 0
    assert [c["name"] for c in calls] == ["scontrol"]  # srun never starts
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "MASTER_ADDR" in errors[0] and "node[07-08]" in errors[0]


@pytest.mark.parametrize("code", [EXIT_REQUEUE, 0, 1, 2])
def test_sbatch_requeues_only_on_the_requeue_exit_code(fakes, code):
    r, calls = fakes(["bash", SBATCH, "configs/tiny.yaml"],
                     env={**JOB, "FAKE_RC_SRUN": str(code)})
    requeues = [c["argv"] for c in calls if c["name"] == "scontrol" and c["argv"][0] == "requeue"]
    if code == 75:
        assert requeues == [["requeue", "123456"]]
        assert r.returncode == 0
    else:
        assert requeues == []
        assert r.returncode == code


def test_sbatch_directives_requeue_and_signal_every_task():
    with open(SBATCH) as f:
        text = f.read()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert "--requeue" in directives
    signal = [d for d in directives if d.startswith("--signal=")]
    assert len(signal) == 1
    # no B: (that signals only the batch shell); some minutes before the limit
    m = re.fullmatch(r"--signal=(?:R:)?(USR1|USR2|TERM)@(\d+)", signal[0])
    assert m and int(m.group(2)) >= 120, signal
    assert re.search(rf"^EXIT_REQUEUE={EXIT_REQUEUE}$", text, re.M)
    # every directive comes before the first command (sbatch stops reading there)
    body = [x for x in text.splitlines()[1:] if x and not x.startswith("#")]
    assert text.index(body[0]) > text.rindex("\n#SBATCH ")


# --- real torchrun ---------------------------------------------------------------------


def _launch(argv, **env):
    full = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **env)
    return subprocess.run(argv, cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=180)


def test_config_errors_under_torchrun_are_error_lines_only():
    r = _launch(["bash", "scripts/pretrain_tiny.sh", "train.lr=1", "model.num_layers=x"],
                NPROC="2")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "error: unknown config key 'train.lr' on the command line; did you mean optim.lr, "
        "train.iters, train.seed?",
        "error: config key 'model.num_layers': expected int, got 'x'",
    ]
    assert r.stdout == ""


def test_size_script_trains_through_torchrun_and_reports_a_missing_file(text_dataset,
                                                                      tmp_path):
    prefix, tok = text_dataset
    args = tiny_overrides(prefix, tok, tmp_path / "run", **{"train.iters": 2,
                                                             "train.eval_interval": 0})
    r = _launch(["bash", "scripts/pretrain_tiny.sh", *args], NPROC="2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" iteration        2/       2 |") == 1
    assert "error" not in r.stderr
    # found after the process group is up: still one error line, the worker's code
    r = _launch(["bash", "scripts/pretrain_tiny.sh", *args, "data.path=[/nonexistent/x]"],
                NPROC="2")
    assert r.returncode == 2
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent/x" in errors[0], r.stderr
    assert "ChildFailedError" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("body,code", [("sys.exit(75)", 75),
                                       ("raise RuntimeError('boom')", 1)])
def test_torchrun_quiet_keeps_the_worker_and_its_code(tmp_path, body, code):
    worker = tmp_path / "worker.py"
    worker.write_text(f"import sys\n{body}\n")
    r = _launch([sys.executable, "scripts/torchrun_quiet.py", "torchrun", "--standalone",
                 "--nproc_per_node", "1", str(worker)])
    assert r.returncode == code
    assert "ChildFailedError" not in r.stderr and "Root Cause" not in r.stderr
    assert r.stderr.splitlines()[-1] == (
        f"error: rank 0 (local rank 0) failed first, with exit code {code}")
    if code == 1:  # the worker's own traceback stays
        assert "Traceback (most recent call last):" in r.stderr
        assert "RuntimeError: boom" in r.stderr


def test_print_is_once_per_launch_and_quiet_on_a_closed_pipe():
    args = [sys.executable, "pretrain_gpt.py", "--config", "configs/tiny.yaml", "--print"]
    r = _launch(args, RANK="1", WORLD_SIZE="2")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # a reader that is gone, as `| head` once it has its lines
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and err == ""


def _configs():
    return sorted(os.path.basename(p)[:-5] for p in os.listdir(os.path.join(ROOT, "configs"))
                  if p.endswith(".yaml") and not p.endswith("base.yaml"))


@pytest.mark.parametrize("size", [c for c in _configs() if c.startswith(("gpt", "paci"))])
def test_every_size_has_a_script_and_a_name(fakes, size):
    """scripts/pretrain_<size>.sh and scripts/pretrain_gpt.sh <size> launch the same."""
    for argv in (["bash", f"{ROOT}/scripts/pretrain_{size}.sh", "train.iters=3"],
                 ["bash", f"{ROOT}/scripts/pretrain_gpt.sh", size, "train.iters=3"]):
        r, calls = fakes(argv)
        assert r.returncode == 0, r.stderr
        assert only(calls, "torchrun")["argv"][3:] == [
            "pretrain_gpt.py", "--config", f"configs/{size}.yaml", "train.iters=3"]


def test_a_size_with_no_config_is_one_error_line_listing_the_sizes(fakes):
    r, calls = fakes(["bash", f"{ROOT}/scripts/pretrain_gpt.sh", "gpt3_999m"])
    assert r.returncode == 2 and not calls
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no config for size 'gpt3_999m'")
    assert "gpt3_13b" in lines[0] and "paci_gpt2_medium" in lines[0]
