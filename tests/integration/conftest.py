"""A small real-text dataset built once per session through the data_prep CLIs."""

import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(args, cwd=ROOT, timeout=300, env=None):
    """Run a command line as a user would; ``env`` entries of None are removed."""
    full = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    env = full
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _descendants(pid):
    """Every live process below ``pid`` (read from /proc; torchrun's workers leave
    its process group, so killing the group alone would orphan them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc):
    """SIGTERM first (torchrun then stops its workers), SIGKILL what is left."""
    tree = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [proc.pid, *tree]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run_shell(command, cwd=ROOT, timeout=300, env=None):
    """Run a shell command line as a user types it; on timeout every process it
    started (torchrun's workers included) is killed and TimeoutExpired raised."""
    full = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=ROOT, **(env or {}))
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate(timeout=30)
        raise subprocess.TimeoutExpired(command, timeout, out, err) from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory):
    """(data prefix, tokenizer path) from Python's own docstrings, tokenized for real."""
    d = tmp_path_factory.mktemp("data")
    steps = [
        ["-m", "data_prep.build_corpus", "--output", str(d), "--sources", "pydoc",
         "--max-mb", "0.4"],
        ["-m", "data_prep.train_tokenizer", "--input", str(d / "corpus.jsonl"),
         "--vocab-size", "512", "--output", str(d / "tok")],
        ["-m", "data_prep.preprocess", "--input", str(d / "corpus.jsonl"), "--tokenizer",
         str(d / "tok.model"), "--output-prefix", str(d / "text_document"), "--append-eod",
         "--workers", "1"],
    ]
    for args in steps:
        r = run_cli(args)
        assert r.returncode == 0, r.stdout + r.stderr
    return str(d / "text_document"), str(d / "tok.model")


def tiny_overrides(prefix, tokenizer, run_dir, **extra):
    """A 2-layer model that runs a few iterations in seconds on one CPU thread."""
    cfg = {
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.seq_length": 32, "data.path": f"[{prefix}]", "data.tokenizer": tokenizer,
        "train.micro_batch_size": 4, "train.global_batch_size": 8, "train.iters": 8,
        "train.eval_interval": 4, "train.eval_iters": 1, "optim.lr": 3e-3,
        "optim.lr_warmup_iters": 2, "logging.interval": 1, "run.dir": str(run_dir),
        "checkpoint.interval": 0, "logging.plot": "false",
    }
    cfg.update(extra)
    return [f"{k}={v}" for k, v in cfg.items()]
