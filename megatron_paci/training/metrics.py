"""Where numbers go: the Megatron log line, ``metrics.jsonl``, wandb, TensorBoard.

Only the logging rank writes. ``metrics.jsonl`` is the run directory's contract
(one JSON object per logged iteration, at least iteration/loss/lr/tokens/
elapsed_s); it is appended to, so a resumed run continues the same file.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from megatron_paci.config.loader import ConfigError
from megatron_paci.config.schema import Config


def format_log_line(row: dict[str, Any], total_iters: int, verbose: bool = False) -> str:
    """One line in the shape Megatron users grep for: the fields of Megatron's line
    (plus MFU where it is known); ``verbose`` adds TFLOP/s, the batch size, the bytes
    sent per collective kind and, in pipelined runs, the logging rank's bubble.
    Everything is in ``metrics.jsonl`` either way."""
    mfu = [f"MFU: {100 * row['mfu']:.1f}%"] if "mfu" in row else []
    if not verbose:
        parts = [
            f" iteration {row['iteration']:8d}/{total_iters:8d}",
            f"consumed samples: {row['consumed_samples']:12d}",
            f"elapsed time per iteration (ms): {row['ms_per_iter']:.1f}",
            f"learning rate: {row['lr']:.3E}",
            f"lm loss: {row['loss']:.6E}",
            f"grad norm: {row['grad_norm']:.3f}",
            f"number of skipped iterations: {row['skipped_iters']:3d}",
            f"tokens/s: {row['tokens_per_s']:.0f}",
            *mfu,
            *([f"ETA: {_hms(row['eta_s'])}"] if "eta_s" in row else []),
        ]
        return " | ".join(parts) + " |"
    parts = [
        f" iteration {row['iteration']:8d}/{total_iters:8d}",
        f"consumed samples: {row['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {row['ms_per_iter']:.1f}",
        f"throughput (tokens/s): {row['tokens_per_s']:.0f}",
        f"TFLOP/s/GPU: {row['tflops']:.3f}",
        *mfu,
        *([f"tokens/s/GPU: {row['tokens_per_s_per_gpu']:.0f}"]
          if "tokens_per_s_per_gpu" in row else []),
        *([f"peak memory (MB): {row['peak_mem_mb']:.0f}"] if "peak_mem_mb" in row else []),
        *([f"ETA: {_hms(row['eta_s'])}"] if "eta_s" in row else []),
        f"learning rate: {row['lr']:.6E}",
        f"global batch size: {row['global_batch_size']:5d}",
        f"lm loss: {row['loss']:.6E}",
        f"grad norm: {row['grad_norm']:.3f}",
        f"number of skipped iterations: {row['skipped_iters']:3d}",
        *([f"bubble: {row['bubble_fraction']:.3f}"] if "bubble_fraction" in row else []),
    ]
    sent = [(k, row.get(f"comm_bytes_{k}", 0)) for k in ("tp", "dp", "pp")]
    if any(v for _, v in sent):
        parts.append("sent MB/iter " + " ".join(f"{k}: {v / 2**20:.2f}" for k, v in sent))
    return " | ".join(parts) + " |"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_eval_line(iteration: int, loss: float) -> str:
    ppl = math.exp(min(loss, 20.0))
    text = f" validation loss at iteration {iteration} | lm loss: {loss:.6E} | lm PPL: {ppl:.6E} "
    bar = "-" * len(text)
    return f"{bar}\n{text}\n{bar}"


class MetricsWriter:
    def __init__(self, cfg: Config, enabled: bool):
        self.enabled = enabled
        self.verbose = cfg.logging.verbose
        self.path = os.path.join(cfg.run.dir, "metrics.jsonl")
        self._wandb = None
        self._tb = None
        # Checked on every rank, not only the one that logs: a missing package then
        # stops every rank with the same error line, before any collective.
        if cfg.logging.wandb:
            _require("wandb", "logging.wandb=true", "pip install wandb")
        if cfg.logging.tensorboard:
            _require("torch.utils.tensorboard", "logging.tensorboard=true",
                     "pip install -e .[tensorboard]")
        if not enabled:
            return
        os.makedirs(cfg.run.dir, exist_ok=True)
        if cfg.logging.wandb:
            self._wandb = _start_wandb(cfg)
        if cfg.logging.tensorboard:
            self._tb = _start_tensorboard(cfg)

    def log(self, row: dict[str, Any], total_iters: int | None = None) -> None:
        """Append a row; print the Megatron line for training rows."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if total_iters is not None:
            print(format_log_line(row, total_iters, self.verbose), flush=True)
        step = row["iteration"]
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _require(module: str, setting: str, install: str) -> None:
    """Raise ConfigError naming the setting and the install command if ``module``
    does not import."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        name = module.rsplit(".", 1)[-1]
        raise ConfigError(f"{setting} but {name} is not installed ({install})") from None


def _start_wandb(cfg: Config):
    import wandb

    # WANDB_MODE, when set, decides (offline on a cluster without internet, disabled);
    # otherwise online needs a key, and without one the run logs offline.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                            else "offline")
    if mode == "offline":
        print("wandb: no WANDB_API_KEY set, logging offline to", cfg.run.dir, file=sys.stderr)
    return wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.run.name or os.path.basename(os.path.abspath(cfg.run.dir)),
        dir=cfg.run.dir,
        config=cfg.to_dict(),
        mode=mode,
        id=wandb_run_id(cfg.run.dir),
        resume="allow",
    )


def wandb_run_id(run_dir: str) -> str:
    """The wandb run of this run directory: made once and kept in ``run_dir/wandb_run_id``,
    so a relaunch (a requeued job) continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    import uuid

    run_id = uuid.uuid4().hex[:16]
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(run_id + "\n")
    return run_id


def _start_tensorboard(cfg: Config):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.path.join(cfg.run.dir, "tensorboard"))


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
