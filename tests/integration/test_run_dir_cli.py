"""The run directory through ``pretrain_gpt.py``: a second run, a resume with another
model, a fresh start over an earlier run."""

import json
import os
import socket

from conftest import run_cli, tiny_overrides


def error_lines(r):
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def test_a_run_dir_in_use_is_refused_naming_the_run_that_holds_it(text_dataset, tmp_path):
    prefix, tok = text_dataset
    run = tmp_path / "run"
    run.mkdir()
    lock = run / "run.lock"
    # This test's process stands in for a first run that is still training.
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": 0, "token": "first"}))
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, run)])
    assert r.returncode == 2, r.stderr
    [line] = error_lines(r)
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in line and str(lock) in line
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(run)) == ["run.lock"]  # nothing written
    assert json.loads(lock.read_text())["token"] == "first"


def test_resume_with_another_shape_and_fresh_start_over_an_earlier_run(text_dataset, tmp_path):
    prefix, tok = text_dataset
    run = tmp_path / "run"
    base = {"train.iters": 4, "train.eval_interval": 0}
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **base)])
    assert r.returncode == 0, r.stderr
    assert not (run / "run.lock").exists()  # released at exit
    files = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}

    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
        **base, "train.iters": 6, "model.hidden_size": 128})])
    assert r.returncode == 2, r.stderr
    [line] = error_lines(r)
    assert "model.hidden_size: 64 -> 128" in line and "Traceback" not in r.stderr
    out = r.stdout.splitlines()
    assert "  model.hidden_size: 64 -> 128" in out and "  train.iters: 4 -> 6" in out
    assert {name: (run / name).read_bytes() for name in files} == files
    assert not (run / "run.lock").exists()  # released on the refusal too

    fresh = tiny_overrides(prefix, tok, run, **{**base, "checkpoint.load": "false"})
    r = run_cli(["pretrain_gpt.py", *fresh])
    assert r.returncode == 2, r.stderr
    [line] = error_lines(r)
    rows = len(files["metrics.jsonl"].splitlines())
    assert f"run.dir {run} holds an earlier run (1 checkpoint (iter_0000004), " \
           f"metrics.jsonl with {rows} rows)" in line
    assert {name: (run / name).read_bytes() for name in files} == files

    r = run_cli(["pretrain_gpt.py", *fresh, "checkpoint.start_over=true"])
    assert r.returncode == 0, r.stderr
    [stamp] = os.listdir(run / "previous")
    moved = run / "previous" / stamp
    assert "moved the earlier run" in r.stdout and str(moved) in r.stdout
    assert (moved / "metrics.jsonl").read_bytes() == files["metrics.jsonl"]
    assert (moved / "config.yaml").read_bytes() == files["config.yaml"]
    assert os.listdir(moved / "checkpoints" / "iter_0000004")  # moved whole, not emptied
    iters = [json.loads(ln)["iteration"] for ln in open(run / "metrics.jsonl")
             if "loss" in json.loads(ln)]
    assert iters == [1, 2, 3, 4]  # the fresh run's rows, once
