"""The training loop: build everything from config, check it, train, evaluate, save.

All input checks (data files, tokenizer vs model vocabulary, sizes) happen in
``Trainer.__init__`` so a bad launch fails in seconds, not after warm-up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_paci.checkpoint.format import resolve_loadable, wait_for_pending_save
from megatron_paci.checkpoint.parts import (
    ModelPart,
    OptimizerPart,
    RngPart,
    TrainingCheckpoint,
    saved_head_is_tied,
)
from megatron_paci.config.loader import ConfigError, format_config, to_yaml
from megatron_paci.config.schema import Config
from megatron_paci.data.gpt_dataset import build_gpt_datasets
from megatron_paci.data.prefetch import prefetched
from megatron_paci.data.sampler import build_pretraining_data_loader
from megatron_paci.data.tokenizer import build_tokenizer
from megatron_paci.data.tokenizer_record import check_dataset_tokenizers
from megatron_paci.kernels.attention import attention_backend
from megatron_paci.kernels.dispatch import select_kernels
from megatron_paci.kernels.parity import Shapes, parity_check
from megatron_paci.model.gpt import GPTModel, StageSpec, count_parameters
from megatron_paci.model.transformer import LayerContext
from megatron_paci.model.vocab import resolve_vocab_size
from megatron_paci.optim.lr_schedule import LRSchedule
from megatron_paci.optim.optimizer import ChunkedOptimizer, Optimizer
from megatron_paci.parallel import comm, liveness
from megatron_paci.parallel.random import capture_rng, restore_rng, seed_everything
from megatron_paci.parallel.state import ParallelState, single_process
from megatron_paci.pipeline.actions import Action
from megatron_paci.pipeline.executor import PipelineExecutor
from megatron_paci.pipeline.partition import chunk_layers
from megatron_paci.pipeline.registry import get_schedule
from megatron_paci.pipeline.simulate import Timeline, draw
from megatron_paci.pipeline.versions import ChunkPolicies
from megatron_paci.tensor_parallel import model_parallel_seed
from megatron_paci.training.flops import dense_bf16_peak_tflops, flops_per_token, part_costs
from megatron_paci.training.generate import sample
from megatron_paci.training.layout import validate_layout
from megatron_paci.training.metrics import MetricsWriter, format_eval_line, read_metrics
from megatron_paci.training.numerics import (
    LossSpikeGuard,
    SkipCounter,
    TrainingDiverged,
    save_blockers,
)
from megatron_paci.training.plan import split_summary
from megatron_paci.training.preemption import (
    EXIT_REQUEUE,
    StopRequests,
    describe,
    test_signal_hook,
)
from megatron_paci.training.run_dir import RunDirLock, any_rank, open_run_dir


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


class Trainer:
    def __init__(self, cfg: Config, pstate: ParallelState | None = None,
                 stops: StopRequests | None = None):
        self.cfg = cfg
        self.pstate = ps = pstate or single_process()
        t = cfg.train
        if (ps.tensor_size, ps.pipeline_size) != (cfg.parallel.tensor, cfg.parallel.pipeline):
            raise ConfigError(
                f"process groups are tp={ps.tensor_size} x pp={ps.pipeline_size} but the config "
                f"says parallel.tensor={cfg.parallel.tensor}, parallel.pipeline="
                f"{cfg.parallel.pipeline}")
        dp = validate_layout(cfg, ps.world_size)
        self.num_micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        if not cfg.data.path:
            raise ConfigError("data.path is empty: give one or more dataset prefixes")
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer is empty: give a sentencepiece .model, a HF "
                              "tokenizer .json, a GPT-2 vocab.json + merges.txt directory or "
                              "null:N")
        self.device = resolve_device(cfg)
        self.autocast_dtype = resolve_precision(cfg, self.device)
        self.log_enabled = self.pstate.is_logging_rank

        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if t.sample_tokens > 0 and t.sample_prompt:
            # Checked now: the sample is drawn after the last step, the worst time to fail.
            try:
                self.tokenizer.tokenize(t.sample_prompt)
            except ValueError as e:
                raise ConfigError(
                    f"train.sample_prompt={t.sample_prompt!r} cannot be tokenized by "
                    f"data.tokenizer={cfg.data.tokenizer} ({e}); give text that tokenizer "
                    "reads (the null tokenizer takes whitespace-separated ids), an empty "
                    "prompt, or train.sample_tokens=0") from e
        self.vocab_size = resolve_vocab_size(cfg, self.tokenizer.vocab_size,
                                             self.pstate.tensor_size)
        self.run_lock = self._open_run_dir()  # before anything is written to run.dir
        eval_samples = t.eval_iters * t.global_batch_size if t.eval_interval > 0 else 0
        unchecked = check_dataset_tokenizers(cfg.data.path, self.tokenizer, cfg.data.tokenizer)
        if unchecked and self.log_enabled:
            print(f"data: {', '.join(unchecked)}: no tokenizer record (not made by "
                  "data_prep.preprocess); not checked against data.tokenizer", flush=True)
        self.train_ds, self.valid_ds, _ = build_gpt_datasets(
            cfg.data.path, cfg.data.split, cfg.model.seq_length, t.seed,
            (t.iters * t.global_batch_size, eval_samples, 0), cfg.data.cache_dir,
            # The tokenizer's vocabulary, not the padded one: ids in the padding are as
            # wrong (no text maps to them), and ids past it are what crashed step 1.
            vocab_size=self.tokenizer.vocab_size,
            vocab_source=f"data.tokenizer={cfg.data.tokenizer}", progress=self.log_enabled,
        )
        if self.train_ds is None:
            raise ConfigError(f"data.split={cfg.data.split} leaves no training data")

        seed_everything(t.seed)
        self.rng_tracker = model_parallel_seed(t.seed, ps.tensor_rank, ps.pipeline_rank)
        self.kernels = select_kernels(cfg.kernels.backend, cfg.kernels.overrides, self.device)
        self.schedule = get_schedule(cfg.pipeline.schedule)
        self._build_stage()
        self.parity_report = self._check_kernels() if cfg.kernels.parity_check else []
        self.progress = Progress()
        self.flops_per_token = flops_per_token(cfg.model, self.vocab_size)
        # MFU is logged where it means something: half precision on a GPU whose
        # dense bf16 peak is known (training/flops.py).
        self.peak_tflops = (dense_bf16_peak_tflops(torch.cuda.get_device_name(self.device))
                            if self.device.type == "cuda" and self.autocast_dtype is not None
                            else None)
        self.ckpt_root = os.path.join(cfg.run.dir, "checkpoints")
        self.metrics = MetricsWriter(cfg, self.log_enabled)
        # Stop requests (signals, the time limit): the launcher's, caught from its start.
        self.stops = stops or StopRequests(t.exit_duration_mins)
        self.exit_code = 0  # EXIT_REQUEUE after a stop for preemption or time

    def _build_stage(self) -> None:
        """This rank's model stage, its optimizer and LR schedule, the schedule's
        weight-version policy and the executor that runs it all."""
        cfg, ps, t = self.cfg, self.pstate, self.cfg.train
        ctx = LayerContext(group=ps.tensor_group, size=ps.tensor_size, rank=ps.tensor_rank,
                           sequence_parallel=cfg.parallel.sequence_parallel,
                           rng=self.rng_tracker, kernels=self.kernels)
        self.chunks = cfg.parallel.virtual_pipeline
        ranges = chunk_layers(cfg.model.num_layers, ps.pipeline_size, self.chunks,
                              cfg.pipeline.layers_per_stage,
                              part_costs(cfg.model, self.vocab_size))[ps.pipeline_rank]
        self.stage = StageSpec.of_chunks(ranges, ps.is_first_stage, ps.is_last_stage)
        model_cfg = self.schedule.stage_model_config(cfg.model, ps.pipeline_size)
        self.untied_for_pipeline = model_cfg.tie_embeddings != cfg.model.tie_embeddings
        self.model = GPTModel(model_cfg, self.vocab_size, stage=self.stage, seed=t.seed,
                              tp=ctx).to(self.device)
        tied = None
        if (ps.pipeline_size > 1 and model_cfg.tie_embeddings
                and (self.stage.pre_process or self.stage.post_process)):
            # First and last stage hold copies of the tied embedding; the last
            # stage's copy is left out of the global grad norm (counted once).
            tied = (self.model.embedding.word_embeddings.weight if self.stage.pre_process
                    else self.model.output_layer.weight)
            tied.pipeline_shared_copy = not self.stage.pre_process
        # Skips are decided over the whole model under a global step (one report for the
        # run), per stage otherwise (one report per stage).
        self.skips = SkipCounter(
            t.max_consecutive_skips, ps.pipeline_rank, self.schedule.global_step,
            report=(self.log_enabled if self.schedule.global_step
                    else ps.tensor_rank == 0 and ps.data_rank == 0))
        self.spike_guard = (LossSpikeGuard(t.loss_spike_factor, self.device)
                            if t.loss_spike_factor > 0 and self.stage.post_process else None)
        self._build_optimizer()
        self.lr_schedule = LRSchedule(cfg.optim, t.iters)
        if tied is not None:
            self.optimizer.tie_across_stages(tied)
        seq_local = cfg.model.seq_length // (ps.tensor_size if cfg.parallel.sequence_parallel
                                             else 1)
        self.executor = PipelineExecutor(
            model=self.model, optimizer=self.optimizer, lr_schedule=self.lr_schedule,
            policy=self.policy, pstate=ps, schedule=self.schedule,
            window=self.num_micro_batches, chunks=self.chunks,
            activation_shape=(seq_local, t.micro_batch_size, cfg.model.hidden_size),
            device=self.device, autocast=self._autocast,
            record_events=cfg.pipeline.timeline,
            verify_versions=cfg.pipeline.verify_versions,
            keep_versions=cfg.pipeline.dump_versions,
            loss_factor=self.spike_guard.multiplier if self.spike_guard else None,
        )

    def _build_optimizer(self) -> None:
        """The optimizer and weight-version policy: one for the rank, or one per model
        chunk when the schedule's chunks step on their own (interleaved PACI, 2BW)."""
        cfg, ps, m = self.cfg, self.pstate, self.num_micro_batches

        def build(named=None) -> Optimizer:
            return Optimizer(self.model, cfg.optim, ps,
                             clip_across_pipeline=self.schedule.global_step,
                             kernels=self.kernels, named=named)

        if self.schedule.optimizer_per_chunk(self.chunks):
            named = [self.model.chunk_parameters(c) for c in range(self.chunks)]
            optimizers = [build(n) for n in named]
            self.optimizer = ChunkedOptimizer(optimizers)
            self.policy = ChunkPolicies([
                self.schedule.make_policy(self.model, m, o.grad_buffer.accumulate,
                                          o.rebind_storage, n)
                for o, n in zip(optimizers, named, strict=True)])
            return
        self.optimizer = build()
        self.policy = self.schedule.make_policy(self.model, m,
                                                self.optimizer.grad_buffer.accumulate,
                                                self.optimizer.rebind_storage)

    def _check_kernels(self) -> list[str]:
        """Run every chosen non-reference kernel once against its reference, on this
        run's shapes, before training (raises KernelError on a mismatch)."""
        cfg, ps = self.cfg, self.pstate
        m = cfg.model
        tp = ps.tensor_size
        shapes = Shapes(
            seq=m.seq_length, batch=cfg.train.micro_batch_size, hidden=m.hidden_size,
            ffn=(m.ffn_hidden_size or 4 * m.hidden_size) // tp,
            heads=m.num_attention_heads // tp, head_dim=m.hidden_size // m.num_attention_heads,
            vocab=self.vocab_size // tp, vocab_total=self.vocab_size)
        dtype = self.autocast_dtype or torch.float32
        return parity_check(self.kernels, shapes, dtype, self.device, ps.tensor_group,
                            seed=cfg.train.seed)

    # --- state -------------------------------------------------------------

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = capture_rng()
        state.update({f"tracker.{k}": v for k, v in self.rng_tracker.get_states().items()})
        return state

    def _restore_rng(self, rng: dict[str, torch.Tensor]) -> None:
        restore_rng(rng)
        self.rng_tracker.set_states({k.removeprefix("tracker."): v for k, v in rng.items()
                                     if k.startswith("tracker.")})

    def _rederive_rng(self, iteration: int) -> None:
        """A fresh state per rank from the seed, its ranks and the iteration: what a
        resume at another layout gets (a saved state belongs to a rank of the old one)."""
        seed = self.cfg.train.seed + 1_000_003 * iteration
        seed_everything(seed)
        tracker = model_parallel_seed(seed, self.pstate.tensor_rank, self.pstate.pipeline_rank)
        self.rng_tracker.set_states(tracker.get_states())

    def _checkpoint(self) -> TrainingCheckpoint:
        """This trainer's parts, as the checkpoint saves and loads them."""
        ps = self.pstate
        model = ModelPart(self.model, ps)
        return TrainingCheckpoint(
            model=model, optimizer=OptimizerPart(self.optimizer, model, ps),
            rng=RngPart(ps.rank, self._rng_state, self._restore_rng, self._rederive_rng),
            policy=self.policy, stashes=self.schedule.stashes_weights,
            json_state=lambda: {
                "consumed_samples": self.progress.consumed_samples,
                "skipped_iters": self.progress.skipped_iters,
                "lr_schedule": self.lr_schedule.state_dict(),
                "schedule": self.cfg.pipeline.schedule},
            layout={"world": ps.world_size, "tensor": ps.tensor_size,
                    "pipeline": ps.pipeline_size, "data": ps.data_size,
                    "virtual_pipeline": self.chunks},
            model_tied=self.model.cfg.tie_embeddings,
            head_choice=self.cfg.checkpoint.untied_head, log=self._print,
            vocab_size=self.cfg.model.vocab_size or self.tokenizer.vocab_size,
            tokenizer_vocab=self.tokenizer.vocab_size)

    def save(self) -> str | None:
        """Write a checkpoint at this drain, unless the state is not one to resume from
        (then the checkpoints already written stay, and keep-last rotates none out)."""
        # Each rank checks what it holds (ZeRO-1: its shard); the flags are then agreed.
        tensors = list(self.model.parameters()) + self.optimizer.local_state()
        non_finite, skipping = save_blockers(tensors, self.skips.streak, self.device)
        if non_finite or skipping:
            why = ("a weight or optimizer moment is not finite" if non_finite else
                   "the last update was skipped for a non-finite gradient or a loss spike")
            self._print(f"not saving a checkpoint at iteration {self.progress.iteration}: "
                        f"{why} on some rank; the checkpoints already written stay")
            return None
        test_signal_hook(self.progress.iteration, self.pstate.rank, "save")
        liveness.set_operation(f"the checkpoint save at iteration {self.progress.iteration}",
                               beat=True)
        path = self._checkpoint().save(self.ckpt_root, self.progress.iteration,
                                       to_yaml(self.cfg), self.cfg.checkpoint.keep_last,
                                       async_save=self.cfg.checkpoint.async_save)
        self._print(f"saved checkpoint at iteration {self.progress.iteration} to {path}")
        return path

    def maybe_resume(self) -> bool:
        path = resolve_loadable(self.ckpt_root) if self.cfg.checkpoint.load else None
        if path is None:
            return False
        meta = self._checkpoint().load(path, saved_head_is_tied(path))
        self.progress = Progress(meta["iteration"], meta["consumed_samples"],
                                 meta.get("skipped_iters", 0))
        self.lr_schedule.load_state_dict(meta["lr_schedule"])
        self.skips.total = self.progress.skipped_iters
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

    def _mean_over_dp(self, loss: torch.Tensor) -> float:
        """Loss for the log: the mean over every dp rank's micro-batches. Reduced on the
        device (NCCL has no CPU tensors) and read once per iteration."""
        total = loss.detach().double().reshape(1)
        comm.all_reduce(total, self.pstate.data_group, "dp")
        return total.item() / self.pstate.data_size

    def _data(self, dataset, consumed: int):
        """Batches for the stages that read data (first: tokens, last: labels)."""
        if not (self.stage.pre_process or self.stage.post_process):
            return None
        d = self.cfg.data
        loader = iter(build_pretraining_data_loader(
            dataset, consumed, self.cfg.train.micro_batch_size, self.pstate.data_rank,
            self.pstate.data_size, d.num_workers))
        return prefetched(loader, d.prefetch if d.num_workers == 0 else 0)

    def evaluate(self) -> float | None:
        """Forward-only pass through the (drained) pipeline; the loss on the last stage."""
        if self.valid_ds is None or self.cfg.train.eval_iters == 0:
            return None
        self.model.eval()
        loss = self.executor.forward_only(self._data(self.valid_ds, 0),
                                          self.cfg.train.eval_iters * self.num_micro_batches)
        self.model.train()
        return None if loss is None else self._mean_over_dp(loss)

    # --- loop --------------------------------------------------------------

    def _print(self, msg: str) -> None:
        if self.log_enabled:
            print(msg, flush=True)

    def _open_run_dir(self) -> RunDirLock | None:
        """Global rank 0 takes run.dir's lock and checks what it holds against this run
        (training/run_dir.py); a refusal there stops every rank, before any writes."""
        lock, error = None, None
        if self.pstate.rank == 0:
            try:
                lock = open_run_dir(self.cfg, self.tokenizer.vocab_size)
            except ConfigError as e:
                error = e
            except OSError as e:  # say, run.dir on a read-only or missing mount
                error = ConfigError(f"run.dir {self.cfg.run.dir}: {e}")
        if any_rank(error is not None, self.device):
            raise error or ConfigError(f"run.dir {self.cfg.run.dir} refused on global rank 0 "
                                       "(its error line says why)")
        return lock

    def _write_run_files(self) -> None:
        if not self.log_enabled:
            return
        os.makedirs(self.cfg.run.dir, exist_ok=True)
        with open(os.path.join(self.cfg.run.dir, "config.yaml"), "w") as f:
            f.write(to_yaml(self.cfg))

    def _next_drain(self, iteration: int) -> int:
        """The next iteration after which the pipeline drains (eval, checkpoint, exit, end)."""
        cfg, t = self.cfg, self.cfg.train
        candidates = [t.iters]
        for every in (t.eval_interval, cfg.checkpoint.interval, t.exit_interval,
                      t.exit_check_interval):
            if every:
                candidates.append((iteration // every + 1) * every)
        return min(candidates)

    def train(self) -> Progress:
        """Resume (if there is a checkpoint), write the run files, train. run.dir's lock
        is released when this returns or raises."""
        try:
            return self._resume_and_train()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _resume_and_train(self) -> Progress:
        cfg, ps = self.cfg, self.pstate
        # Load before writing: a checkpoint that does not fit leaves run.dir as it was.
        self.maybe_resume()
        self._write_run_files()
        self._print(format_config(cfg))
        self._print(f"model: {count_parameters(self.model) / 1e6:.2f}M parameters on this stage, "
                    f"padded vocab {self.vocab_size}, device {self.device}, precision "
                    f"{self.autocast_dtype or torch.float32}, {self.num_micro_batches} "
                    "micro-batches per iteration")
        self._print(self.kernels.table())
        m = cfg.model
        self._print(attention_backend(self.device, self.autocast_dtype or torch.float32,
                                      m.num_attention_heads // ps.tensor_size,
                                      m.hidden_size // m.num_attention_heads))
        if self.parity_report:
            self._print("kernel parity check against the torch references passed:\n"
                        + "\n".join(self.parity_report))
        if ps.pipeline_size > 1:
            self._print(f"pipeline: {self.schedule.title}, {ps.pipeline_size} stages, window "
                        f"{self.num_micro_batches}"
                        + (f", {self.chunks} model chunks per rank (interleaved)"
                           if self.chunks > 1 else "")
                        + f"; last stage holds layers {self.stage.describe()}; split "
                        + split_summary(cfg, self.vocab_size))
        if self.untied_for_pipeline:
            self._print(f"pipeline: {self.schedule.title} uses an untied output layer "
                        "(model.tie_embeddings ignored): keeping a tied copy in sync would "
                        "need a first/last-stage all-reduce at every step")
        # Handlers this call installs are removed when it returns (a trainer used from a
        # library or a test must not leave SIGTERM caught); the launcher's stay.
        installed_here = self.stops.install()
        try:
            return self._train()
        except TrainingDiverged:
            # What was logged and saved so far stays readable: an asynchronous save
            # completes, metrics are flushed.
            wait_for_pending_save()
            self.metrics.close()
            raise
        finally:
            if installed_here:
                self.stops.uninstall()

    def _train(self) -> Progress:
        cfg, t = self.cfg, self.cfg.train
        if self.progress.iteration >= t.iters:
            self._print(f"nothing to do: already at iteration {self.progress.iteration} "
                        f"of train.iters={t.iters}")
            return self.progress
        batches = self._data(self.train_ds, self.progress.consumed_samples)
        self._window_rows: list[tuple[float | None, float, dict[str, int]]] = []
        self._window_start = self._run_start = time.perf_counter()
        comm.STATS.reset()
        while self.progress.iteration < t.iters:
            it = self.progress.iteration
            drain = self._next_drain(it)
            self.model.train()
            self.executor.train_segment(batches, it + 1, drain - it, self._after_step)
            # Drained: no micro-batch in flight, every stage at the same version.
            p = self.progress
            self._log_pipeline()
            if t.eval_interval and (p.iteration % t.eval_interval == 0 or p.iteration == t.iters):
                self._log_eval()
            save_now = cfg.checkpoint.interval and p.iteration % cfg.checkpoint.interval == 0
            exit_now = t.exit_interval and p.iteration % t.exit_interval == 0
            saved = save_now or exit_now or (p.iteration == t.iters and cfg.checkpoint.save_at_end)
            if saved:
                self.save()
            # Every rank is at this drain: one all-reduce settles a pending stop request.
            reason = self.stops.agreed(self.device) if p.iteration < t.iters else 0
            if reason:
                if not saved:
                    self.save()
                self._print(f"saved and stopping at iteration {p.iteration}: "
                            f"{describe(reason)}; relaunch to continue (exit code "
                            f"{EXIT_REQUEUE})")
                self.exit_code = EXIT_REQUEUE
                break
            if exit_now and p.iteration < t.iters:
                self._print(f"exiting at iteration {p.iteration} (train.exit_interval)")
                break
        wait_for_pending_save()  # an asynchronous save is complete before the run ends
        self.finish(sample=self.exit_code == 0)
        return self.progress

    def _after_step(self, k: int, window_loss: torch.Tensor | None, norm: float,
                    skipped: bool) -> None:
        """Per-iteration bookkeeping, called by the executor right after STEP(k) on this stage."""
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        loss = None
        if self.stage.post_process and window_loss is not None:
            loss = self._mean_over_dp(window_loss)
        p.iteration = k
        p.consumed_samples += t.global_batch_size
        test_signal_hook(k, self.pstate.rank)
        p.skipped_iters += int(skipped)
        self._count_skip(k, loss, norm, skipped)
        self._window_rows.append((loss, norm, comm.STATS.snapshot()))
        comm.STATS.reset()
        if p.iteration % cfg.logging.interval == 0 or p.iteration == self._next_drain(k - 1):
            now = time.perf_counter()
            per_iter = (now - self._window_start) / len(self._window_rows)
            if self.log_enabled:
                self._log_train(self._window_rows, per_iter,
                                t.global_batch_size * cfg.model.seq_length,
                                now - self._run_start)
            self._window_rows, self._window_start = [], time.perf_counter()

    def _count_skip(self, k: int, loss: float | None, norm: float, skipped: bool) -> None:
        """Log a skipped update where it happened; stop after too many in a row
        (TrainingDiverged). A finite, unskipped window loss joins the spike guard's mean."""
        guard = self.spike_guard
        if not skipped:
            if guard is not None and loss is not None and math.isfinite(loss):
                guard.observe(loss)
            self.skips.record(k, False, "")
            return
        if loss is not None and not math.isfinite(loss):
            why = f"non-finite loss ({loss})"
        elif loss is not None and guard is not None and guard.mean() is not None:
            why = (f"loss spike (a micro-batch loss above train.loss_spike_factor="
                   f"{guard.factor:g} x the running mean {guard.mean():.4f}; window loss "
                   f"{loss:.4f})")
        else:
            why = f"non-finite gradient norm ({norm})"
        line = self.skips.record(k, True, why)
        if line and self.skips.report:
            print(line, flush=True)

    def _log_pipeline(self) -> None:
        """At a drain: versions each stage saw, gathered to the logging rank."""
        ps, tel = self.pstate, self.executor.telemetry
        if self.cfg.pipeline.dump_versions and ps.tensor_rank == 0 and ps.data_rank == 0:
            out = os.path.join(self.cfg.run.dir, "pipeline")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"versions_stage{ps.pipeline_rank}.csv"), "w") as f:
                f.write("stage,chunk,microbatch,version_forward,version_backward\n")
                f.writelines(f"{s},{c},{j},{vf},{vb}\n" for s, c, j, vf, vb in tel.rows())
        mine = torch.tensor([float(tel.max_drift()), float(tel.peak_in_flight),
                             float(tel.peak_versions), self.executor.measured_bubble(),
                             peak_rss_mb(), tel.mean_ms("F"), tel.mean_ms("B"),
                             tel.mean_ms("S")], dtype=torch.float64, device=self.device)
        table = comm.all_gather(mine.reshape(1, -1), ps.pipeline_group, "pp").tolist()

        def col(i: int, digits: int | None = None) -> list:
            return [round(r[i], digits) if digits else int(r[i]) for r in table]

        if not self.log_enabled:
            return
        row = {"iteration": self.progress.iteration, "peak_rss_mb": col(4, 1),
               "action_ms": {"F": col(5, 3), "B": col(6, 3), "S": col(7, 3)}}
        if ps.pipeline_size > 1:  # drift, in-flight, versions and bubble: pipelines only
            self._print(f"pipeline {self.schedule.title}: max updates crossed per stage "
                        f"{col(0)}, peak in-flight micro-batches {col(1)}, peak weight "
                        f"versions {col(2)}, measured bubble {col(3, 3)}")
            row.update({"max_drift": col(0), "peak_in_flight": col(1),
                        "peak_weight_versions": col(2), "bubble_per_stage": col(3, 4)})
        self.metrics.log(row)

    def _draw_measured_timeline(self) -> None:
        """Every stage's recorded action times, drawn on the logging rank."""
        ps = self.pstate
        mine = self.executor.telemetry.events
        if ps.pipeline_group is not None:
            gathered: list = [None] * ps.pipeline_size
            dist.all_gather_object(gathered, mine, group=ps.pipeline_group)
        else:
            gathered = [mine]
        if not self.log_enabled:
            return
        events = [(s, Action(kind if kind != "S" else "STEP", index, chunk if kind != "S" else 0),
                   t0, t1)
                  for s, stage_events in enumerate(gathered)
                  for kind, index, t0, t1, chunk in stage_events]
        t_min = min((e[2] for e in events), default=0.0)
        events = sorted(((s, a, t0 - t_min, t1 - t_min) for s, a, t0, t1 in events),
                        key=lambda e: (e[2], e[0]))
        tl = Timeline(self.schedule.name, ps.pipeline_size, self.num_micro_batches,
                      self.progress.iteration, events, self.chunks)
        out = os.path.join(self.cfg.run.dir, "pipeline")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "timeline.png")
        draw(tl, path, title=f"{self.schedule.title} measured, P={ps.pipeline_size} "
                             f"M={self.num_micro_batches} (seconds)")
        self._print(f"measured pipeline timeline written to {path}")

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
            # Per GPU (per process), as Megatron reports it.
            "tflops": tokens_per_s * self.flops_per_token / 1e12 / self.pstate.world_size,
            "grad_norm": window[-1][1],
            "skipped_iters": p.skipped_iters,
            "global_batch_size": self.cfg.train.global_batch_size,
            "tokens_per_s_per_gpu": tokens_per_s / self.pstate.world_size,
            # This (logging) rank's peak: the device allocator's on a GPU, RSS on a CPU.
            "peak_mem_mb": (torch.cuda.max_memory_allocated(self.device) / 2**20
                            if self.device.type == "cuda" else peak_rss_mb()),
            "eta_s": max(0, self.cfg.train.iters - p.iteration) * per_iter,
        }
        if self.pstate.pipeline_size > 1:
            row["bubble_fraction"] = self.executor.measured_bubble()
        if self.peak_tflops:
            row["mfu"] = row["tflops"] / self.peak_tflops
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

    def finish(self, sample: bool = True) -> None:
        """End of training. Work that runs collectives (the timeline gather, the
        tensor-parallel sample) runs on every rank it involves before the logging
        rank's own files and prints, so no rank waits on a peer already at exit."""
        if self.cfg.pipeline.timeline:
            self._draw_measured_timeline()
        text = self._sample() if sample and self.cfg.train.sample_tokens > 0 else None
        self.metrics.close()
        if not self.log_enabled:
            return
        self._print_loss_summary()
        if self.cfg.logging.plot:
            self.plot_losses()
        if self.cfg.train.sample_tokens > 0 and self.pstate.pipeline_size > 1:
            self._print("sample: the model is split over pipeline stages; sample from the "
                        "checkpoint with python -m megatron_paci.training.generate "
                        f"--run-dir {self.cfg.run.dir}")
        elif text is not None:
            print(f"\n----- sample (prompt: {self.cfg.train.sample_prompt!r}) -----\n{text}"
                  "\n-----", flush=True)

    def _sample(self) -> str | None:
        """The end-of-training sample, drawn by every rank of the logging rank's tp
        group (its forward all-reduces over tp; same ids and seed, same result).
        None on other ranks and when the model is split over pipeline stages."""
        ps = self.pstate
        if ps.pipeline_size > 1 or ps.data_rank != 0:
            return None
        prompt = self.cfg.train.sample_prompt
        ids = self.tokenizer.tokenize(prompt) if prompt else [self.tokenizer.eod]
        out = sample(self.model, ids, self.cfg.train.sample_tokens,
                     vocab_limit=self.tokenizer.vocab_size, seed=self.cfg.train.seed)
        # Decode prompt and continuation together: sentencepiece drops a leading
        # space when a piece list is decoded on its own.
        return self.tokenizer.detokenize(out if prompt else out[1:])

    def _print_loss_summary(self) -> None:
        rows = [r for r in read_metrics(self.cfg.run.dir) if "loss" in r]
        if len(rows) < 2:
            return
        tail = rows[-min(10, len(rows) // 2):]
        mean_tail = sum(r["loss"] for r in tail) / len(tail)
        print(f"training loss: {rows[0]['loss']:.3f} at iteration {rows[0]['iteration']} -> "
              f"{mean_tail:.3f} (mean of the last {len(tail)} logged iterations)", flush=True)

    def plot_losses(self) -> str:
        from megatron_paci.utils.figures import loss_figure, save_figure

        rows = read_metrics(self.cfg.run.dir)
        train = [(r["iteration"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["iteration"], r["val_loss"]) for r in rows if "val_loss" in r]
        path = os.path.join(self.cfg.run.dir, "loss.png")
        save_figure(loss_figure(([x for x, _ in train], [y for _, y in train]),
                                ([x for x, _ in val], [y for _, y in val]),
                                title="language-model loss"), path)  # fmt: skip
        self._print(f"loss plot written to {path}")
        return path
