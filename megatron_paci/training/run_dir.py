"""Who is using a run directory, and what a launch may do to what it holds.

Checked by global rank 0 before anything under ``run.dir`` is written:

- **The lock** (``run.dir/run.lock``: host, pid, start time; its mtime is the heartbeat,
  refreshed by a daemon thread). A second run on the same directory would overwrite the
  first one's checkpoints and interleave its metrics, so it is refused, naming the first.
  A lock left by a run that is gone (its pid no longer runs on this host, or, from
  another host, its heartbeat is older than ``STALE_AFTER_S``) is taken over, with a
  warning.
- **A resume** compares the checkpoint's ``config.yaml`` with this run's config: the
  differences are printed (``key: saved -> this run``), and changes that give tensors
  another shape are refused in one line, before the load would fail halfway. A change
  of the padded vocabulary alone (another tp or ``make_vocab_size_divisible_by``) is
  not: the load converts the padding rows, and a line says so.
- **A fresh start** (``checkpoint.load=false``) over an earlier run's checkpoints or
  metrics is refused unless ``checkpoint.start_over=true``, which moves them to
  ``run.dir/previous/<time>/``; nothing is deleted.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import yaml

from megatron_paci.checkpoint.format import CONFIG_FILE, list_checkpoints
from megatron_paci.checkpoint.inspect import config_diff
from megatron_paci.checkpoint.vocab_rows import FILL_RULE
from megatron_paci.config.loader import ConfigError, to_yaml
from megatron_paci.config.schema import Config, ModelConfig
from megatron_paci.model.gpt import padded_vocab_size

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
# A lock from another host whose heartbeat is older than this is taken to be left behind
# (its pid cannot be checked from here). Generous: shared filesystems cache mtimes.
STALE_AFTER_S = 120.0
PREVIOUS_DIR = "previous"
# What a run writes into run.dir; a start over moves these (those present) aside.
RUN_FILES = ("checkpoints", "metrics.jsonl", CONFIG_FILE, "loss.png", "pipeline",
             "tensorboard", "wandb", "wandb_run_id")
_CKPT_RE = re.compile(r"^iter_\d{7,}(\.partial)?$")

Log = Callable[[str], None]


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _log(msg: str) -> None:
    print(msg, flush=True)


# --- the lock --------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), which tells a reused pid
    from the process that wrote a lock; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _ago(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s / 3600:.1f} h ago"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


class RunDirLock:
    """The run directory's lock, held by global rank 0 of one run."""

    def __init__(self, run_dir: str, *, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S, warn: Log = _warn) -> None:
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_FILE)
        self.stale_after_s, self.heartbeat_s, self.warn = stale_after_s, heartbeat_s, warn
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def record(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "pid_start": _process_start(self.pid),
                "started": time.time(), "token": self.token}

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the run that holds it."""
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_left_behind()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record(), f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            self._thread = threading.Thread(target=self._beat, name="run-dir-heartbeat",
                                            daemon=True)
            self._thread.start()
            atexit.register(self.release)
            return
        raise ConfigError(f"{self.path}: could not take the run directory's lock (other "
                          "runs keep taking it); launch one run per run.dir")

    def _take_over_if_left_behind(self) -> None:
        """Remove the lock at ``self.path`` if the run that wrote it is gone; raise if
        it is alive. Returns with the lock gone (or retaken by a third run: the caller
        tries again)."""
        text, age = _read_lock(self.path)
        if text is None:
            return  # released meanwhile
        holder = _parse(text)
        gone = self._gone(holder, age)
        if gone is None:
            raise ConfigError(self._busy_message(holder, age))
        # Move it away under a name of our own, then check it is the lock we judged:
        # a run that took the lock in between gets it back.
        moved = f"{self.path}.{self.token}.stale"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        with open(moved) as f:
            still = f.read() == text
        if not still:
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
        os.unlink(moved)
        if still and gone:
            self.warn(f"{self.path}: taking over the lock of a run that is gone "
                      f"({_describe(holder)}; {gone})")

    def _gone(self, holder: dict[str, Any] | None, age: float) -> str | None:
        """Why the lock's run is gone ("" for an earlier lock of this very process), or
        None if it may be alive."""
        if holder is None:
            return (f"unreadable lock, last touched {_ago(age)}"
                    if age > self.stale_after_s else None)
        if holder.get("host") == self.host:
            pid = holder["pid"]
            if pid == self.pid:
                return ""  # a trainer of this process built earlier and never trained
            if not _pid_alive(pid):
                return f"pid {pid} is not running"
            start = _process_start(pid)
            if start is not None and holder.get("pid_start") not in (None, start):
                return f"pid {pid} is now another process"
            return None
        if age > self.stale_after_s:
            return (f"heartbeat {_ago(age)}, over the {self.stale_after_s:.0f} s after which "
                    "a lock from another host counts as left behind")
        return None

    def _busy_message(self, holder: dict[str, Any] | None, age: float) -> str:
        who = _describe(holder) if holder else "a run that is starting"
        return (f"run.dir {self.run_dir} is in use by another run ({who}, heartbeat "
                f"{_ago(age)}; lock file {self.path}): two runs in one directory overwrite "
                "each other's checkpoints and metrics. Wait for it to end or give another "
                "run.dir; if that run is gone, remove the lock file (a lock from another "
                f"host is taken over once its heartbeat is {self.stale_after_s:.0f} s old)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            text, _ = _read_lock(self.path)
            holder = _parse(text) if text else None
            if not holder or holder.get("token") != self.token:
                return  # taken over: leave the new holder's heartbeat alone
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if it is still this run's (idempotent; at exit too)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        with contextlib.suppress(Exception):
            atexit.unregister(self.release)
        if os.getpid() != self.pid:
            return  # a forked child (a data loader worker) never owns the lock
        text, _ = _read_lock(self.path)
        holder = _parse(text) if text else None
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _read_lock(path: str) -> tuple[str | None, float]:
    """The lock's text and the seconds since its heartbeat; (None, 0) if there is none."""
    try:
        with open(path) as f:
            text = f.read()
        return text, time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None, 0.0


def _parse(text: str | None) -> dict[str, Any] | None:
    try:
        holder = json.loads(text or "")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    return (f"host {holder.get('host')}, pid {holder.get('pid')}"
            + (f", started {_when(started)}" if isinstance(started, (int, float)) else ""))


# --- what the directory holds ------------------------------------------------------


@dataclasses.dataclass
class RunContents:
    """What an earlier run left in a run directory."""

    checkpoints: list[str]  # complete iter_N directories
    incomplete: list[str]  # iter_N.partial, and iter_N without meta.json or .metadata
    metrics_rows: int

    @classmethod
    def of(cls, run_dir: str) -> RunContents:
        root = os.path.join(run_dir, "checkpoints")
        complete = {os.path.basename(p) for _, p in list_checkpoints(root)}
        names = sorted(n for n in os.listdir(root) if _CKPT_RE.match(n)) \
            if os.path.isdir(root) else []
        rows = 0
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if os.path.isfile(metrics):
            with open(metrics, "rb") as f:
                rows = sum(1 for line in f if line.strip())
        return cls([n for n in names if n in complete],
                   [n for n in names if n not in complete], rows)

    @property
    def used(self) -> bool:
        return bool(self.checkpoints or self.incomplete or self.metrics_rows)

    def describe(self) -> str:
        parts = []
        if self.checkpoints:
            c = self.checkpoints
            parts.append(f"{len(c)} checkpoint{'s' * (len(c) > 1)} ("
                         + (f"{c[0]} .. {c[-1]}" if len(c) > 1 else c[0]) + ")")
        if self.incomplete:
            parts.append(f"{len(self.incomplete)} incomplete ({', '.join(self.incomplete[:3])}"
                         + (" ..." if len(self.incomplete) > 3 else "") + ")")
        if self.metrics_rows:
            parts.append(f"metrics.jsonl with {self.metrics_rows} rows")
        return ", ".join(parts)


def move_aside(run_dir: str, now: float | None = None) -> tuple[str, list[str]]:
    """Move what a run wrote into ``run_dir/previous/<time>/``; returns (that folder,
    the names moved). Renames only: nothing is copied or deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    dest = os.path.join(run_dir, PREVIOUS_DIR, stamp)
    n = 1
    while os.path.lexists(dest):
        dest = os.path.join(run_dir, PREVIOUS_DIR, f"{stamp}-{n}")
        n += 1
    names = [name for name in RUN_FILES if os.path.lexists(os.path.join(run_dir, name))]
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(run_dir, name), os.path.join(dest, name))
    return dest, names


# --- the config of a resume --------------------------------------------------------


VOCAB = "vocabulary (model.vocab_size or the tokenizer's)"
PADDED_VOCAB = ("padded vocabulary (model.vocab_size or the tokenizer's, "
                "model.make_vocab_size_divisible_by, parallel.tensor)")


def tensor_shapes(config: dict[str, Any], tokenizer_vocab: int) -> dict[str, Any]:
    """The config values that set the model's tensor shapes, as they take effect (a
    ``None`` resolved to what it stands for), from a config as YAML loads it."""
    m = {**dataclasses.asdict(ModelConfig()), **(config.get("model") or {})}
    tp = (config.get("parallel") or {}).get("tensor", 1)
    h = m["hidden_size"]
    vocab = m["vocab_size"] or tokenizer_vocab
    shapes = {
        "model.num_layers": m["num_layers"],
        "model.hidden_size": h,
        "model.num_attention_heads": m["num_attention_heads"],
        "model.ffn_hidden_size (None: 4 x hidden_size)": m["ffn_hidden_size"] or 4 * h,
        "model.position_embedding": m["position_embedding"],
        VOCAB: vocab,
        PADDED_VOCAB: padded_vocab_size(vocab, m["make_vocab_size_divisible_by"], tp),
    }
    if m["position_embedding"] == "learned":
        shapes["position table rows (model.max_position_embeddings, None: "
               "model.seq_length)"] = m["max_position_embeddings"] or m["seq_length"]
    return shapes


def shape_changes(saved: dict[str, Any], given: dict[str, Any],
                  tokenizer_vocab: int) -> list[str]:
    """``what: saved -> given`` for every change that gives a tensor another shape
    (tied vs untied heads are checkpoint.untied_head's business, not listed here).

    The padded vocabulary alone may change: with the same real vocabulary the load
    converts the embedding and head rows (checkpoint/vocab_rows.py). A real vocabulary
    change is listed when it changes the padded row count (with the same rows, the
    tensors load as they are, as before)."""
    a, b = tensor_shapes(saved, tokenizer_vocab), tensor_shapes(given, tokenizer_vocab)
    convertible = a[VOCAB] == b[VOCAB] or a[PADDED_VOCAB] == b[PADDED_VOCAB]
    return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}"
            for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)
            and not (convertible and k in (VOCAB, PADDED_VOCAB))]


def padded_vocab_change(saved: dict[str, Any], given: dict[str, Any],
                        tokenizer_vocab: int) -> tuple[int, int] | None:
    """(saved, given) padded vocabulary rows where only the padding changes, else None."""
    a, b = tensor_shapes(saved, tokenizer_vocab), tensor_shapes(given, tokenizer_vocab)
    if a[VOCAB] == b[VOCAB] and a[PADDED_VOCAB] != b[PADDED_VOCAB]:
        return a[PADDED_VOCAB], b[PADDED_VOCAB]
    return None


def _saved_config(run_dir: str, checkpoint: str) -> tuple[str, dict[str, Any]] | None:
    """The config the resumed checkpoint was trained with: its own config.yaml, else
    the run directory's."""
    for path in (os.path.join(checkpoint, CONFIG_FILE), os.path.join(run_dir, CONFIG_FILE)):
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); it "
                                  "is the config the checkpoint was saved with") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of config sections")
            return path, data
    return None


def check_resume(cfg: Config, checkpoint: str, tokenizer_vocab: int, log: Log = _log) -> None:
    """Print how this run's config differs from the checkpoint's; refuse a change of
    tensor shapes (ConfigError, one line) before anything is loaded or written."""
    found = _saved_config(cfg.run.dir, checkpoint)
    if found is None:
        return
    source, saved = found
    given = yaml.safe_load(to_yaml(cfg))
    diff = config_diff(saved, given)
    if diff:
        log(f"resume: {len(diff)} setting{'s' * (len(diff) > 1)} differ from {source} "
            "(key: saved -> this run):\n" + "\n".join(f"  {row}" for row in diff))
    changed = shape_changes(saved, given, tokenizer_vocab)
    rows = padded_vocab_change(saved, given, tokenizer_vocab)
    if rows and not changed:
        log(f"resume: the padded vocabulary changes from {rows[0]} to {rows[1]} rows (same "
            f"{tensor_shapes(given, tokenizer_vocab)[VOCAB]} real tokens, which load "
            f"exactly); padding rows beyond {rows[1]} are dropped, {FILL_RULE}")
    if changed:
        raise ConfigError(
            f"cannot resume {checkpoint} with another model shape: {'; '.join(changed)} "
            f"(saved in {source}). Set these back, give a new run.dir, or start over in "
            f"this one with checkpoint.load=false checkpoint.start_over=true (moves the "
            f"earlier run to {os.path.join(cfg.run.dir, PREVIOUS_DIR)}/)")


def check_contents(cfg: Config, tokenizer_vocab: int, log: Log = _log) -> None:
    """What this launch may do with what ``run.dir`` holds; raises ConfigError, or
    moves an earlier run aside where that is what was asked for."""
    run_dir = cfg.run.dir
    if not os.path.isdir(run_dir):
        return
    held = RunContents.of(run_dir)
    if cfg.checkpoint.load:
        if held.checkpoints:
            check_resume(cfg, os.path.join(run_dir, "checkpoints", held.checkpoints[-1]),
                         tokenizer_vocab, log)
        elif held.used:
            # Nothing to resume: this run starts at iteration 0, and the earlier one's
            # rows would be repeated in metrics.jsonl.
            what = held.describe()
            dest, names = move_aside(run_dir)
            log(f"run.dir: nothing to resume in {run_dir} (no complete checkpoint) but it "
                f"holds an earlier run ({what}): moved {', '.join(names)} to {dest}; this "
                "run starts at iteration 0")
        return
    if not held.used:
        return
    if not cfg.checkpoint.start_over:
        raise ConfigError(
            f"checkpoint.load=false but run.dir {run_dir} holds an earlier run "
            f"({held.describe()}); a fresh start there would overwrite its checkpoints one "
            "by one and repeat its metrics. Resume it with checkpoint.load=true, give a new "
            "run.dir, or set checkpoint.start_over=true to move it to "
            f"{os.path.join(run_dir, PREVIOUS_DIR)}/<time>/")
    what = held.describe()
    dest, names = move_aside(run_dir)
    log(f"run.dir: checkpoint.start_over=true: moved the earlier run ({what}; "
        f"{', '.join(names)}) to {dest}")


def open_run_dir(cfg: Config, tokenizer_vocab: int, log: Log = _log,
                 warn: Log = _warn) -> RunDirLock:
    """Global rank 0, before anything in ``cfg.run.dir`` is written: take its lock, then
    check what it holds (``check_contents``). Returns the held lock; raises ConfigError
    with the lock released."""
    lock = RunDirLock(cfg.run.dir, warn=warn)
    lock.acquire()
    try:
        check_contents(cfg, tokenizer_vocab, log)
    except BaseException:
        lock.release()
        raise
    return lock


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank calls it)."""
    t = torch.tensor([float(flag)], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
