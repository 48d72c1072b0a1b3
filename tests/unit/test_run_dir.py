"""The run directory's lock and the checks a launch passes before it writes there."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_paci.config import ConfigError, load_config, to_yaml
from megatron_paci.training.run_dir import (
    LOCK_FILE,
    RunDirLock,
    check_contents,
    open_run_dir,
    padded_vocab_change,
    shape_changes,
)

HOST = socket.gethostname()


def plant(run_dir, **record):
    """A lock file as another run would have written it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": HOST, "started": time.time() - 3600, "token": "theirs",
                   **record}, f)
    return path


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_run_s_lock_refuses_the_second_run_naming_it(tmp_path):
    live = os.getppid()  # alive for the whole test, and not this process
    path = plant(tmp_path, pid=live)
    before = open(path).read()
    with pytest.raises(ConfigError) as e:
        RunDirLock(str(tmp_path)).acquire()
    msg = str(e.value)
    assert f"host {HOST}, pid {live}" in msg and "heartbeat 0 s ago" in msg
    assert str(tmp_path / LOCK_FILE) in msg and "\n" not in msg
    assert open(path).read() == before  # left alone


def test_lock_of_a_dead_pid_is_taken_over_with_one_warning(tmp_path):
    pid = dead_pid()
    plant(tmp_path, pid=pid)
    warnings = []
    lock = RunDirLock(str(tmp_path), warn=warnings.append)
    lock.acquire()
    try:
        assert len(warnings) == 1 and f"pid {pid} is not running" in warnings[0]
        held = json.load(open(tmp_path / LOCK_FILE))
        assert (held["host"], held["pid"], held["token"]) == (HOST, os.getpid(), lock.token)
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_is_not_the_run_that_wrote_the_lock(tmp_path):
    plant(tmp_path, pid=os.getppid(), pid_start="1")  # the parent started later than tick 1
    warnings = []
    lock = RunDirLock(str(tmp_path), warn=warnings.append)
    lock.acquire()
    lock.release()
    assert len(warnings) == 1 and "is now another process" in warnings[0]


def test_another_host_s_lock_is_stale_only_once_its_heartbeat_is_old(tmp_path):
    path = plant(tmp_path, host="elsewhere.invalid", pid=1)
    with pytest.raises(ConfigError, match="host elsewhere.invalid, pid 1"):
        RunDirLock(str(tmp_path), stale_after_s=60).acquire()
    old = time.time() - 61
    os.utime(path, (old, old))
    warnings = []
    lock = RunDirLock(str(tmp_path), stale_after_s=60, warn=warnings.append)
    lock.acquire()
    lock.release()
    assert len(warnings) == 1 and "heartbeat 61 s ago" in warnings[0]


def test_heartbeat_keeps_the_lock_fresh_and_release_removes_only_our_own(tmp_path):
    lock = RunDirLock(str(tmp_path), heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / LOCK_FILE
    os.utime(path, (0, 0))
    deadline = time.time() + 5
    while os.stat(path).st_mtime < time.time() - 60 and time.time() < deadline:
        time.sleep(0.05)
    assert os.stat(path).st_mtime > time.time() - 60
    # Taken over meanwhile (say, judged stale from another host): not ours to remove.
    path.write_text(json.dumps({"host": "x", "pid": 1, "token": "theirs"}))
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"


def test_an_earlier_lock_of_this_very_process_is_retaken_quietly(tmp_path):
    first = RunDirLock(str(tmp_path))
    first.acquire()  # a trainer built and never trained
    warnings = []
    second = RunDirLock(str(tmp_path), warn=warnings.append)
    second.acquire()
    first.release()  # leaves the second's lock in place
    assert json.load(open(tmp_path / LOCK_FILE))["token"] == second.token
    second.release()
    assert warnings == [] and not (tmp_path / LOCK_FILE).exists()


# --- config comparison ------------------------------------------------------------------


def raw(**model):
    """A saved config as YAML loads it (model section only matters here)."""
    return {"model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                      "ffn_hidden_size": None, "seq_length": 32,
                      "max_position_embeddings": None, "vocab_size": None,
                      "make_vocab_size_divisible_by": 128, "position_embedding": "learned",
                      **model}, "parallel": {"tensor": 1}}


def test_shape_changes_list_what_changes_a_tensor_and_nothing_else():
    base = raw()
    assert shape_changes(base, raw(dropout=0.0, init_std=0.5, rotary_base=1.0), 500) == []
    assert shape_changes(base, raw(ffn_hidden_size=256), 500) == []  # None meant 4 x 64
    got = shape_changes(base, raw(hidden_size=128), 500)
    assert got == ["model.hidden_size: 64 -> 128",
                   "model.ffn_hidden_size (None: 4 x hidden_size): 256 -> 512"]
    rows = "position table rows (model.max_position_embeddings, None: model.seq_length)"
    assert shape_changes(base, raw(seq_length=64), 500) == [f"{rows}: 32 -> 64"]
    assert shape_changes(base, raw(seq_length=64, max_position_embeddings=32), 500) == []
    rope = raw(position_embedding="rope")
    assert shape_changes(rope, raw(position_embedding="rope", seq_length=64), 500) == []
    # 500 tokens pad to 512 at multiples of 128 and of 64, to 1000 at multiples of 1000.
    assert shape_changes(base, raw(make_vocab_size_divisible_by=64), 500) == []


def test_a_padded_vocabulary_change_is_accepted_and_a_real_one_refused():
    base = raw()  # 500 tokens, padded to 512
    # Only the padding changes (another divisor, another tp): the load converts rows.
    assert shape_changes(base, raw(make_vocab_size_divisible_by=1000), 500) == []
    assert padded_vocab_change(base, raw(make_vocab_size_divisible_by=1000), 500) == (512, 1000)
    tp2 = {**raw(make_vocab_size_divisible_by=300), "parallel": {"tensor": 2}}
    assert shape_changes(base, tp2, 500) == [] and padded_vocab_change(base, tp2, 500) == (512, 600)
    # Another real vocabulary with another row count: which rows are real is unknown.
    got = shape_changes(base, raw(vocab_size=600), 500)
    assert got == ["vocabulary (model.vocab_size or the tokenizer's): 500 -> 600",
                   "padded vocabulary (model.vocab_size or the tokenizer's, "
                   "model.make_vocab_size_divisible_by, parallel.tensor): 512 -> 640"]
    assert padded_vocab_change(base, raw(vocab_size=600), 500) is None
    # Same rows, other real size: the tensors load as they are (as before).
    assert shape_changes(base, raw(vocab_size=510), 500) == []


def test_resume_at_another_padding_logs_the_conversion(tmp_path):
    run = tmp_path / "run"
    earlier_run(run, cfg_for(run))  # null:500 pads to 512 at multiples of 128
    log = []
    check_contents(cfg_for(run, **{"parallel.tensor": 2,
                                   "model.make_vocab_size_divisible_by": 192}), 500, log.append)
    assert any(line.startswith("resume: the padded vocabulary changes from 512 to 768 rows "
                               "(same 500 real tokens") and "copies" in line for line in log)
    with pytest.raises(ConfigError, match="vocabulary .*: 500 -> 600"):
        check_contents(cfg_for(run, **{"parallel.tensor": 2, "model.vocab_size": 600}), 500,
                       log.append)


# --- what a launch may do with an earlier run -------------------------------------------


def cfg_for(run_dir, **overrides):
    base = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
            "model.seq_length": 32, "data.path": "[x]", "data.tokenizer": "null:500",
            "train.iters": 8, "run.dir": str(run_dir)}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def earlier_run(run_dir, cfg, complete=(2, 4), partial=(6,), rows=3):
    """A run directory as a run of ``cfg`` leaves it (checkpoints as files only)."""
    ckpts = run_dir / "checkpoints"
    for it in complete:
        d = ckpts / f"iter_{it:07d}"
        d.mkdir(parents=True)
        for name in ("meta.json", ".metadata", "__0_0.distcp"):
            (d / name).write_text(name)
        (d / "config.yaml").write_text(to_yaml(cfg))
    for it in partial:
        (ckpts / f"iter_{it:07d}.partial").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i + 1, "loss": 5.0}) + "\n" for i in range(rows)))


def snapshot(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def test_resume_with_another_model_shape_prints_the_diff_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    earlier_run(run, cfg_for(run))
    before = snapshot(run)
    log = []
    cfg = cfg_for(run, **{"model.hidden_size": 128, "train.iters": 10})
    with pytest.raises(ConfigError) as e:
        open_run_dir(cfg, 500, log=log.append)
    msg = str(e.value)
    assert "\n" not in msg and str(run / "checkpoints" / "iter_0000004") in msg
    assert "model.hidden_size: 64 -> 128" in msg and "train.iters" not in msg
    assert "checkpoint.start_over=true" in msg
    lines = log[0].splitlines()
    assert "  model.hidden_size: 64 -> 128" in lines and "  train.iters: 8 -> 10" in lines
    assert snapshot(run) == before  # lock released, nothing moved or written


def test_resume_with_other_settings_only_prints_the_diff(tmp_path):
    run = tmp_path / "run"
    earlier_run(run, cfg_for(run))
    log = []
    check_contents(cfg_for(run, **{"train.iters": 12, "model.dropout": 0.0}), 500, log.append)
    assert log[0].startswith("resume: 2 settings differ from "
                             f"{run / 'checkpoints' / 'iter_0000004' / 'config.yaml'}")
    assert log[0].splitlines()[1:] == ["  model.dropout: 0.1 -> 0.0", "  train.iters: 8 -> 12"]


def test_a_fresh_start_over_an_earlier_run_is_refused_naming_what_it_holds(tmp_path):
    run = tmp_path / "run"
    earlier_run(run, cfg_for(run))
    before = snapshot(run)
    with pytest.raises(ConfigError) as e:
        check_contents(cfg_for(run, **{"checkpoint.load": False}), 500, print)
    msg = str(e.value)
    assert f"run.dir {run} holds an earlier run" in msg
    assert "2 checkpoints (iter_0000002 .. iter_0000004)" in msg
    assert "1 incomplete (iter_0000006.partial)" in msg and "metrics.jsonl with 3 rows" in msg
    assert snapshot(run) == before


@pytest.mark.parametrize("complete", [(2, 4), ()])
def test_start_over_moves_the_earlier_run_aside(tmp_path, complete):
    run = tmp_path / "run"
    earlier_run(run, cfg_for(run), complete=complete)
    (run / "notes.txt").write_text("mine")  # not the run's: stays
    before = snapshot(run)
    log = []
    # checkpoint.load=true with nothing complete to resume moves aside the same way.
    overrides = {"checkpoint.load": False, "checkpoint.start_over": True} if complete else {}
    check_contents(cfg_for(run, **overrides), 500, log.append)
    [dest] = os.listdir(run / "previous")
    moved = run / "previous" / dest
    assert sorted(os.listdir(run)) == ["notes.txt", "previous"]
    assert snapshot(moved) == {k: v for k, v in before.items() if k != "notes.txt"}
    assert len(log) == 1 and str(moved) in log[0] and "metrics.jsonl with 3 rows" in log[0]


def test_a_fresh_start_in_an_empty_or_new_directory_passes(tmp_path):
    check_contents(cfg_for(tmp_path / "new", **{"checkpoint.load": False}), 500, print)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    check_contents(cfg_for(tmp_path / "empty", **{"checkpoint.load": False}), 500, print)
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path / "empty") == ["metrics.jsonl"]
