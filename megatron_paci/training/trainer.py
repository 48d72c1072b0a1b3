"""The training loop: build everything from config, check it, train, evaluate, save.

All input checks (data files, tokenizer vs model vocabulary, sizes) happen in
``Trainer.__init__`` so a bad launch fails in seconds, not after warm-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from megatron_paci.checkpoint.format import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_paci.checkpoint.sharding import as_global
from megatron_paci.config.loader import ConfigError, format_config, to_yaml
from megatron_paci.config.schema import Config
from megatron_paci.data.gpt_dataset import build_gpt_datasets
from megatron_paci.data.sampler import build_pretraining_data_loader
from megatron_paci.data.tokenizer import build_tokenizer
from megatron_paci.model.gpt import GPTModel, count_parameters, padded_vocab_size
from megatron_paci.model.transformer import TPContext
from megatron_paci.optim.lr_schedule import LRSchedule
from megatron_paci.optim.optimizer import Optimizer
from megatron_paci.parallel import comm
from megatron_paci.parallel.random import capture_rng, restore_rng, seed_everything
from megatron_paci.parallel.state import ParallelState, single_process
from megatron_paci.parallel.validate import validate_layout
from megatron_paci.tensor_parallel import model_parallel_seed
from megatron_paci.training.flops import flops_per_token
from megatron_paci.training.generate import sample
from megatron_paci.training.metrics import MetricsWriter, format_eval_line, read_metrics


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available")
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def resolve_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if cfg.train.precision == "bf16":
        if device.type != "cuda":
            raise ConfigError("train.precision=bf16 needs CUDA; use fp32 (or auto) on the CPU")
        return torch.bfloat16
    if cfg.train.precision == "auto" and device.type == "cuda":
        return torch.bfloat16
    return None


def resolve_vocab_size(cfg: Config, tokenizer_vocab: int, tensor_parallel: int) -> int:
    """Padded model vocabulary; refuses a tokenizer that does not fit the model."""
    if cfg.model.vocab_size is not None and tokenizer_vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {cfg.data.tokenizer} has {tokenizer_vocab} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size or retrain "
            "the tokenizer with a smaller vocabulary"
        )
    return padded_vocab_size(
        cfg.model.vocab_size or tokenizer_vocab, cfg.model.make_vocab_size_divisible_by,
        tensor_parallel,
    )


class Trainer:
    def __init__(self, cfg: Config, pstate: ParallelState | None = None):
        self.cfg = cfg
        self.pstate = ps = pstate or single_process()
        t = cfg.train
        dp = validate_layout(cfg, ps.world_size)
        self.num_micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        if not cfg.data.path:
            raise ConfigError("data.path is empty: give one or more dataset prefixes")
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer is empty: give a sentencepiece .model path")
        self.device = resolve_device(cfg)
        self.autocast_dtype = resolve_precision(cfg, self.device)
        self.log_enabled = self.pstate.is_logging_rank

        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.vocab_size = resolve_vocab_size(cfg, self.tokenizer.vocab_size,
                                             self.pstate.tensor_size)
        eval_samples = t.eval_iters * t.global_batch_size if t.eval_interval > 0 else 0
        self.train_ds, self.valid_ds, _ = build_gpt_datasets(
            cfg.data.path, cfg.data.split, cfg.model.seq_length, t.seed,
            (t.iters * t.global_batch_size, eval_samples, 0), cfg.data.cache_dir,
        )
        if self.train_ds is None:
            raise ConfigError(f"data.split={cfg.data.split} leaves no training data")

        seed_everything(t.seed)
        self.rng_tracker = model_parallel_seed(t.seed, ps.tensor_rank, ps.pipeline_rank)
        tp = TPContext(group=ps.tensor_group, size=ps.tensor_size, rank=ps.tensor_rank,
                       sequence_parallel=cfg.parallel.sequence_parallel, rng=self.rng_tracker)
        self.model = GPTModel(cfg.model, self.vocab_size, seed=t.seed, tp=tp).to(self.device)
        self.optimizer = Optimizer(self.model, cfg.optim, ps)
        self.lr_schedule = LRSchedule(cfg.optim, t.iters)
        self.progress = Progress()
        self.flops_per_token = flops_per_token(cfg.model, self.vocab_size)
        self.ckpt_root = os.path.join(cfg.run.dir, "checkpoints")
        self.metrics = MetricsWriter(cfg, self.log_enabled)

    # --- state -------------------------------------------------------------

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = capture_rng()
        state.update({f"tracker.{k}": v for k, v in self.rng_tracker.get_states().items()})
        return state

    def _checkpoint_tensors(self, create_optimizer_state: bool) -> dict[str, Any]:
        """Tensors keyed by parameter name; tp shards described as global DTensors."""
        dims = {n: getattr(p, "tensor_parallel_dim", None)
                for n, p in self.model.named_parameters()}
        model = {n: as_global(t, dims.get(n), self.pstate)
                 for n, t in self.model.state_dict().items()}
        optim = {}
        for key, t in self.optimizer.state_by_name(create=create_optimizer_state).items():
            name = key.rsplit(".", 1)[0]
            optim[key] = as_global(t, dims.get(name) if t.ndim else None, self.pstate)
        return {"model": model, "optimizer": optim,
                f"rng_rank{self.pstate.rank}": self._rng_state()}

    def save(self) -> str:
        tensors = self._checkpoint_tensors(create_optimizer_state=False)
        ps = self.pstate
        meta = {
            "consumed_samples": self.progress.consumed_samples,
            "skipped_iters": self.progress.skipped_iters,
            "lr_schedule": self.lr_schedule.state_dict(),
            "schedule": self.cfg.pipeline.schedule,
            "layout": {"world": ps.world_size, "tensor": ps.tensor_size,
                       "pipeline": ps.pipeline_size, "data": ps.data_size},
        }
        path = save_checkpoint(self.ckpt_root, self.progress.iteration, tensors, meta,
                               to_yaml(self.cfg), keep_last=self.cfg.checkpoint.keep_last)
        self._print(f"saved checkpoint at iteration {self.progress.iteration} to {path}")
        return path

    def maybe_resume(self) -> bool:
        path = latest_checkpoint(self.ckpt_root) if self.cfg.checkpoint.load else None
        if path is None:
            return False
        # Current tensors (and RNG states) serve as correctly shaped targets to load into.
        tensors = self._checkpoint_tensors(create_optimizer_state=True)
        meta = load_checkpoint(path, tensors)
        self.optimizer.load_state_by_name(
            {k: v.to_local() if hasattr(v, "to_local") else v
             for k, v in tensors["optimizer"].items()})
        self.progress = Progress(meta["iteration"], meta["consumed_samples"],
                                 meta.get("skipped_iters", 0))
        self.lr_schedule.load_state_dict(meta["lr_schedule"])
        rng = tensors[f"rng_rank{self.pstate.rank}"]
        restore_rng(rng)
        self.rng_tracker.set_states({k.removeprefix("tracker."): v for k, v in rng.items()
                                     if k.startswith("tracker.")})
        self._truncate_metrics(self.progress.iteration)
        self._print(f"resumed from {path} at iteration {self.progress.iteration}, "
                    f"{self.progress.consumed_samples} samples consumed")
        return True

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop rows logged after the checkpoint, so a resumed run appends cleanly."""
        if not self.log_enabled:
            return
        rows = [r for r in read_metrics(self.cfg.run.dir) if r["iteration"] <= iteration]
        with open(self.metrics.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    # --- steps -------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        with self._autocast():
            return self.model(tokens=tokens[:, :-1], labels=tokens[:, 1:]).mean()

    def _mean_over_dp(self, total: torch.Tensor, count: int) -> float:
        """Loss for the log: averaged over every micro-batch of every dp rank."""
        total = total.detach().reshape(1).double()
        comm.all_reduce(total, self.pstate.data_group, "dp")
        return total.item() / (count * self.pstate.data_size)

    def train_step(self, batches) -> tuple[float, float, bool]:
        """One global batch: accumulate, sync, clip, step. Returns (loss, grad norm, skipped)."""
        self.model.train()
        self.optimizer.zero_grad()
        total = torch.zeros((), device=self.device)
        for i in range(self.num_micro_batches):
            last = i == self.num_micro_batches - 1
            with contextlib.nullcontext() if last else self.optimizer.no_sync():
                loss = self._loss(next(batches))
                (loss / self.num_micro_batches).backward()
            total += loss.detach()
        norm, skipped = self.optimizer.step(self.lr_schedule.lr)
        if not skipped:
            self.lr_schedule.step()
        return self._mean_over_dp(total, self.num_micro_batches), norm, skipped

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_ds is None or self.cfg.train.eval_iters == 0:
            return None
        self.model.eval()
        loader = build_pretraining_data_loader(
            self.valid_ds, 0, self.cfg.train.micro_batch_size, self.pstate.data_rank,
            self.pstate.data_size, self.cfg.data.num_workers,
        )
        batches = iter(loader)
        count = self.cfg.train.eval_iters * self.num_micro_batches
        total = sum(self._loss(next(batches)).detach().double() for _ in range(count))
        self.model.train()
        return self._mean_over_dp(total, count)

    # --- loop --------------------------------------------------------------

    def _print(self, msg: str) -> None:
        if self.log_enabled:
            print(msg, flush=True)

    def _write_run_files(self) -> None:
        if not self.log_enabled:
            return
        os.makedirs(self.cfg.run.dir, exist_ok=True)
        with open(os.path.join(self.cfg.run.dir, "config.yaml"), "w") as f:
            f.write(to_yaml(self.cfg))

    def train(self) -> Progress:
        cfg, t = self.cfg, self.cfg.train
        self._write_run_files()
        self._print(format_config(cfg))
        self._print(f"model: {count_parameters(self.model) / 1e6:.2f}M parameters, padded vocab "
                    f"{self.vocab_size}, device {self.device}, precision "
                    f"{self.autocast_dtype or torch.float32}, {self.num_micro_batches} "
                    "micro-batches per iteration")
        self.maybe_resume()
        if self.progress.iteration >= t.iters:
            self._print(f"nothing to do: already at iteration {self.progress.iteration} "
                        f"of train.iters={t.iters}")
            return self.progress
        loader = build_pretraining_data_loader(
            self.train_ds, self.progress.consumed_samples, t.micro_batch_size,
            self.pstate.data_rank, self.pstate.data_size, cfg.data.num_workers,
        )
        batches = iter(loader)
        tokens_per_iter = t.global_batch_size * cfg.model.seq_length
        window: list[tuple[float, float]] = []
        window_start = time.perf_counter()
        run_start = window_start
        while self.progress.iteration < t.iters:
            comm.STATS.reset()
            loss, norm, skipped = self.train_step(batches)
            comm_bytes = comm.STATS.snapshot()
            p = self.progress
            p.iteration += 1
            p.consumed_samples += t.global_batch_size
            p.skipped_iters += int(skipped)
            window.append((loss, norm, comm_bytes))
            if p.iteration % cfg.logging.interval == 0 or p.iteration == t.iters:
                now = time.perf_counter()
                per_iter = (now - window_start) / len(window)
                self._log_train(window, per_iter, tokens_per_iter, now - run_start)
                window, window_start = [], time.perf_counter()
            if t.eval_interval and (p.iteration % t.eval_interval == 0 or p.iteration == t.iters):
                self._log_eval()
            save_now = cfg.checkpoint.interval and p.iteration % cfg.checkpoint.interval == 0
            exit_now = t.exit_interval and p.iteration % t.exit_interval == 0
            if save_now or exit_now or (p.iteration == t.iters and cfg.checkpoint.save_at_end):
                self.save()
            if exit_now and p.iteration < t.iters:
                self._print(f"exiting at iteration {p.iteration} (train.exit_interval)")
                break
        self.finish()
        return self.progress

    def _log_train(self, window, per_iter: float, tokens_per_iter: int, elapsed: float) -> None:
        p = self.progress
        tokens_per_s = tokens_per_iter / per_iter
        row = {
            "iteration": p.iteration,
            "loss": sum(x[0] for x in window) / len(window),
            "lr": self.lr_schedule.lr_at(max(0, self.lr_schedule.num_steps - 1)),
            "tokens": p.consumed_samples * self.cfg.model.seq_length,
            "elapsed_s": round(elapsed, 3),
            "consumed_samples": p.consumed_samples,
            "ms_per_iter": per_iter * 1000.0,
            "tokens_per_s": tokens_per_s,
            "tflops": tokens_per_s * self.flops_per_token / 1e12,
            "grad_norm": window[-1][1],
            "skipped_iters": p.skipped_iters,
            "global_batch_size": self.cfg.train.global_batch_size,
        }
        for kind in ("tp", "dp", "pp"):
            row[f"comm_bytes_{kind}"] = sum(x[2].get(kind, 0) for x in window) // len(window)
        self.metrics.log(row, total_iters=self.cfg.train.iters)

    def _log_eval(self) -> None:
        loss = self.evaluate()
        if loss is None:
            return
        self._print(format_eval_line(self.progress.iteration, loss))
        self.metrics.log({"iteration": self.progress.iteration, "val_loss": loss,
                          "val_ppl": math.exp(min(loss, 20.0))})

    def finish(self) -> None:
        self.metrics.close()
        if not self.log_enabled:
            return
        self._print_loss_summary()
        if self.cfg.logging.plot:
            self.plot_losses()
        if self.cfg.train.sample_tokens > 0:
            prompt = self.cfg.train.sample_prompt
            ids = self.tokenizer.tokenize(prompt) if prompt else [self.tokenizer.eod]
            out = sample(self.model, ids, self.cfg.train.sample_tokens,
                         vocab_limit=self.tokenizer.vocab_size, seed=self.cfg.train.seed)
            # Decode prompt and continuation together: sentencepiece drops a leading
            # space when a piece list is decoded on its own.
            text = self.tokenizer.detokenize(out if prompt else out[1:])
            print(f"\n----- sample (prompt: {prompt!r}) -----\n{text}\n-----", flush=True)

    def _print_loss_summary(self) -> None:
        rows = [r for r in read_metrics(self.cfg.run.dir) if "loss" in r]
        if len(rows) < 2:
            return
        tail = rows[-min(10, len(rows) // 2):]
        mean_tail = sum(r["loss"] for r in tail) / len(tail)
        print(f"training loss: {rows[0]['loss']:.3f} at iteration {rows[0]['iteration']} -> "
              f"{mean_tail:.3f} (mean of the last {len(tail)} logged iterations)", flush=True)

    def plot_losses(self) -> str:
        from megatron_paci.utils.plots import line_plot

        rows = read_metrics(self.cfg.run.dir)
        train = [(r["iteration"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["iteration"], r["val_loss"]) for r in rows if "val_loss" in r]
        series = {"train loss": ([x for x, _ in train], [y for _, y in train])}
        if val:
            series["validation loss"] = ([x for x, _ in val], [y for _, y in val])
        path = os.path.join(self.cfg.run.dir, "loss.png")
        line_plot(path, series, title="language-model loss", xlabel="iteration",
                  ylabel="loss")
        self._print(f"loss plot written to {path}")
        return path
