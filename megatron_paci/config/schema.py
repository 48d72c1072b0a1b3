"""Typed configuration sections.

Every knob a run has lives here, one dataclass per section, so that YAML files,
command-line overrides and the printed config all speak the same names. Field
types drive how override strings are parsed (see ``loader.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class ModelConfig:
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None  # None -> 4 * hidden_size
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # None -> seq_length
    vocab_size: int | None = None  # None -> taken from the tokenizer
    make_vocab_size_divisible_by: int = 128
    position_embedding: str = "learned"  # learned | rope
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_std: float = 0.02
    # Activation recomputation (Megatron's names): none | full (each transformer layer's
    # forward runs again at its backward) | selective (only the attention core,
    # softmax(QK^T)V, is recomputed). See docs/pipeline.md, "Activation recomputation".
    recompute: Literal["none", "full", "selective"] = "none"


@dataclass
class DataConfig:
    # Dataset prefixes (``PREFIX.bin``/``PREFIX.idx``), optionally weighted:
    # ``[0.7, a, 0.3, b]``.
    path: list[Any] = field(default_factory=list)
    # A sentencepiece .model, a HF tokenizer .json, a GPT-2 vocab.json + merges.txt
    # directory (or "gpt2-bpe:VOCAB,MERGES"), or "null:N"; see data/tokenizer.py.
    tokenizer: str = ""
    split: str = "969,30,1"
    cache_dir: str | None = None
    num_workers: int = 0
    # Micro-batches read ahead on a background thread while a stage waits on its peers
    # (data/prefetch.py); 0 reads each on the critical path. Same batches either way. Off
    # by default: on 2 CPU cores the thread took CPU from compute and gained nothing
    # (docs/benchmarks.md, the data.prefetch A/B); a GPU run's idle host may gain.
    prefetch: int = 0


@dataclass
class TrainConfig:
    iters: int = 1000
    micro_batch_size: int = 4
    global_batch_size: int = 32
    seed: int = 1234
    eval_interval: int = 100
    eval_iters: int = 10
    precision: str = "auto"  # auto | fp32 | bf16 (bf16 autocast needs CUDA)
    device: str = "auto"  # auto | cpu | cuda
    exit_interval: int = 0  # stop (after a checkpoint) once iteration % this == 0; 0 = off
    # Drain every N iterations to agree on a pending SIGTERM/SIGUSR1 (0: at the drains
    # the run has anyway: evaluation, checkpoints, exit_interval).
    exit_check_interval: int = 0
    exit_duration_mins: float = 0.0  # save and stop once the run has lasted this long
    # Stop with an error after this many updates in a row skipped for a non-finite
    # gradient (or a loss spike) on one stage; 0 keeps skipping.
    max_consecutive_skips: int = 10
    # Skip the update of a window with a micro-batch loss above this many times the
    # running mean of the last 100 windows (0 = off; counts as a skip).
    loss_spike_factor: float = 0.0
    sample_prompt: str = ""  # text generated from at the end of training
    sample_tokens: int = 0  # 0 = no sample


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None -> train.iters
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    distributed_optimizer: bool = False  # ZeRO-1: shard fp32 master weights + Adam state over dp
    overlap_grad_reduce: bool = True  # start each bucket's dp all-reduce as soon as it is ready
    grad_bucket_mb: float = 160.0  # bucket size for the dp gradient reduction


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # Model chunks per pipeline rank (Megatron's virtual pipeline: interleaved 1F1B).
    virtual_pipeline: int = 1
    sequence_parallel: bool = False
    timeout_s: float = 600.0


@dataclass
class PipelineConfig:
    # A registered schedule (pipeline/schedules.py: 1f1b_flush, pipedream_2bw, paci)
    # or file:PATH, a file of per-rank action lists (docs/pipeline.md).
    schedule: str = "1f1b_flush"
    # None -> even split; [3, 1] by hand; auto -> balanced by FLOPs per stage, embedding
    # and output layer included (pipeline/partition.py).
    layers_per_stage: list[int] | Literal["auto"] | None = None
    dump_versions: bool = False  # write (stage, j, v_F, v_B) per micro-batch to run.dir/pipeline/
    timeline: bool = False  # record action times; draw run.dir/pipeline/timeline.png at the end
    verify_versions: bool = False  # checksum the weights each F and B sees (slow; for tests)


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | triton | torch | apex
    overrides: list[str] = field(default_factory=list)  # per op, e.g. [layer_norm=torch]
    parity_check: bool = True  # run each chosen kernel against its reference at start-up


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0 -> only at the end of training
    save_at_end: bool = True
    keep_last: int = 0  # 0 keeps every checkpoint
    load: bool = True  # resume from run.dir/checkpoints when one exists
    # With load=false on a run.dir that holds an earlier run (checkpoints, metrics.jsonl):
    # move them to run.dir/previous/<time>/ and start over, instead of refusing.
    start_over: bool = False
    async_save: bool = False  # write in the background; training stalls only for the host copy
    # An untied checkpoint loaded into a tied model: refuse (unless the head equals the
    # embedding) | use_embedding | use_head (which trained tensor the tie keeps).
    untied_head: str = "refuse"


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: bool = False
    wandb_project: str = "megatron_paci"
    tensorboard: bool = False
    plot: bool = True  # loss curve PNG in the run directory at the end
    verbose: bool = False  # full log line: TFLOP/s, batch size, bytes sent, bubble


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
