"""Dry-run planner: what a launch would put on each GPU, worked out before any GPU is used.

``python pretrain_gpt.py --config C --dry-run --world-size N --gpu-memory-gb G`` prints
``format_plan(make_plan(...))``: the layout check the launch runs (``validate_layout``),
which ranks hold which layers and shards, per-GPU memory under every registered
schedule, FLOPs per token and each schedule's simulated bubble. No process group is
started and no device is touched, so it runs on a login node.

Memory per GPU for a stage whose tp shard holds N parameters, in bytes:

- weights 4N (fp32: bf16 runs autocast over fp32 weights); gradients 4N (the fp32
  ``main_grad`` buffer); AdamW's exp_avg + exp_avg_sq 8N, or 8N/dp with
  ``optim.distributed_optimizer`` (fp32 weights alias its master buffer, no copy);
  4N per extra weight copy the schedule keeps (``spec.weights.copies``: 2BW's stash).
- activations: what each in-flight micro-batch keeps for its backward, summed at the
  peak of the stage's own action list (``spec.actions``). Per layer it is the term-by-term
  count of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (Sec. 4.1), which gives s·b·h·(34 + 5·a·s/h) bytes for 16-bit
  activations, byte-sized dropout masks and stored attention scores, and divides the
  tensor-parallel region by t (everything, with sequence parallelism). ``SavedBytes``
  replaces its element sizes with the ones this code saves on the target device.
- under bf16 autocast, each in-flight micro-batch also keeps the bf16 copies autocast
  made of the stage's matmul weights for its forward (2 bytes a weight): autocast's cast
  cache lives for one autocast region, one forward.

Not counted: the CUDA context, NCCL buffers, allocator fragmentation and transient
buffers (the logits gradient, all-gathers). A layout fits when the estimate is at most
``FIT_SHARE`` of the GPU's memory, which leaves the rest for them.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass, field

from megatron_paci.config.loader import ConfigError
from megatron_paci.config.schema import Config, ModelConfig
from megatron_paci.model.gpt import padded_vocab_size
from megatron_paci.model.transformer import ffn_size
from megatron_paci.parallel.state import ParallelConfigError, layout_table
from megatron_paci.pipeline.partition import (
    AUTO,
    chunk_layers,
    describe_split,
    max_over_mean,
    resolve_sizes,
)
from megatron_paci.pipeline.registry import ScheduleSpec, get_schedule, schedule_names
from megatron_paci.pipeline.simulate import Costs, bubble_fraction, simulate, steady_state_bubble
from megatron_paci.training.flops import flops_per_token, part_costs
from megatron_paci.training.layout import validate_layout

GIB = 2**30
FIT_SHARE = 0.9
WEIGHT_BYTES = 4  # fp32 weights
GRAD_BYTES = 4  # fp32 main_grad
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
BUBBLE_WINDOWS = 4  # windows simulated for the bubble: enough for a steady state


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedBytes:
    """Bytes per element of each kind of tensor a layer keeps for its backward."""

    name: str
    act: float  # matmul inputs, q/k/v, attention output: the activation dtype
    residual: float  # LayerNorm inputs (the residual stream)
    gelu_input: float  # the fc1 output the GeLU backward reads
    mask: float  # a stored dropout-mask element (0: regenerated from a seed)
    scores: bool  # softmax output, its mask and the dropped probabilities (a·s² each)
    attention_output: bool  # a fused attention kernel keeps its output for the backward
    logits: float  # the logits the cross-entropy backward reads
    embedding_mask: float  # the embedding dropout's mask (always torch's dropout)
    weight_copy: float  # autocast's cast of each matmul weight, per micro-batch


# The paper's count: fp16 activations and residual stream, byte masks, scores stored.
MEGATRON_FP16 = SavedBytes("16-bit activations, byte masks, attention scores stored",
                           act=2, residual=2, gelu_input=2, mask=1, scores=True,
                           attention_output=False, logits=2, embedding_mask=1, weight_copy=0)


def saved_bytes(cfg: Config, device: str = "cuda") -> SavedBytes:
    """What this code keeps per element on ``device`` (``cuda`` or ``cpu``).

    CUDA: SDPA's flash / memory-efficient backends keep no s x s scores but their output;
    the residual stream is fp32 (fp32 weights); the Triton kernels regenerate dropout
    masks from a seed and keep the pre-GeLU tensor in the activation dtype, torch's
    reference kernels keep bool masks and an fp32 pre-GeLU (bf16 + fp32 bias promotes).
    CPU (fp32 only): torch's dropout keeps a mask of the input's dtype, and SDPA keeps
    the scores (math backend) exactly when attention dropout is on.
    """
    m = cfg.model
    if device == "cpu":
        scores = m.attention_dropout > 0
        return SavedBytes("CPU fp32, reference kernels", act=4, residual=4, gelu_input=4,
                          mask=4, scores=scores, attention_output=not scores, logits=4,
                          embedding_mask=4, weight_copy=0)
    bf16 = cfg.train.precision in ("bf16", "auto")
    act = 2 if bf16 else 4
    copy = 2 if bf16 else 0
    if cfg.kernels.backend in ("auto", "triton"):
        return SavedBytes(f"CUDA {'bf16 autocast' if bf16 else 'fp32'}, Triton kernels, "
                          "flash attention", act=act, residual=4, gelu_input=act, mask=0,
                          scores=False, attention_output=True, logits=act, embedding_mask=1,
                          weight_copy=copy)
    return SavedBytes(f"CUDA {'bf16 autocast' if bf16 else 'fp32'}, torch kernels, "
                      "flash attention", act=act, residual=4, gelu_input=4, mask=1,
                      scores=False, attention_output=True, logits=4, embedding_mask=1,
                      weight_copy=copy)


def layer_activation_bytes(m: ModelConfig, micro_batch: int, tp: int = 1,
                           sequence_parallel: bool = False,
                           sb: SavedBytes = MEGATRON_FP16) -> float:
    """Bytes one transformer layer keeps for one micro-batch's backward.

    With ``MEGATRON_FP16``, f = 4h and dropout on, this is the paper's
    s·b·h·(10 + 24/t + 5·a·s/(h·t)), and s·b·h·(34 + 5·a·s/h)/t with sequence parallelism.
    ``model.recompute=full`` keeps only the layer's input (the recompute's transient copy
    of one layer is not counted); ``selective`` drops what the attention core keeps: the
    scores, their mask, or a fused kernel's output.
    """
    s, b, h, a, f = m.seq_length, micro_batch, m.hidden_size, m.num_attention_heads, ffn_size(m)
    if m.recompute == "full":
        return s * b * h * sb.residual / (tp if sequence_parallel else 1)
    if m.recompute == "selective":
        sb = dataclasses.replace(sb, scores=False, attention_output=False)
    hidden_mask = sb.mask if m.dropout > 0 else 0.0
    score_mask = sb.mask if m.attention_dropout > 0 else 0.0
    # Outside the tensor-parallel region (replicated over tp unless sequence parallel):
    # the two LayerNorm inputs, the qkv and fc1 inputs, the two hidden dropout masks.
    outside = 2 * sb.residual + 2 * sb.act + 2 * hidden_mask
    # Inside it (split over tp): q, k, v, the attention output a fused kernel keeps, the
    # proj input, the pre-GeLU fc1 output and the fc2 input.
    inside = (4 * sb.act + (sb.act if sb.attention_output else 0.0)
              + (f / h) * (sb.gelu_input + sb.act))
    if sb.scores:  # softmax output, its dropout mask and the dropped probabilities
        inside += (2 * sb.act + score_mask) * a * s / h
    outside_share = 1.0 / tp if sequence_parallel else 1.0
    return s * b * h * (outside * outside_share + inside / tp)


def embedding_activation_bytes(m: ModelConfig, micro_batch: int, tp: int = 1,
                               sequence_parallel: bool = False,
                               sb: SavedBytes = MEGATRON_FP16) -> float:
    """The embedding dropout's mask, on the first stage."""
    if m.dropout <= 0:
        return 0.0
    return m.seq_length * micro_batch * m.hidden_size * sb.embedding_mask / (
        tp if sequence_parallel else 1)


def head_activation_bytes(m: ModelConfig, micro_batch: int, vocab: int, tp: int = 1,
                          sequence_parallel: bool = False,
                          sb: SavedBytes = MEGATRON_FP16) -> float:
    """Final norm input, the head's input (the full sequence) and the logits shard."""
    sbh = m.seq_length * micro_batch * m.hidden_size
    norm_in = sbh * sb.residual / (tp if sequence_parallel else 1)
    return norm_in + sbh * sb.act + m.seq_length * micro_batch * (vocab / tp) * sb.logits


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------
def layer_parameters(m: ModelConfig, tp: int = 1) -> tuple[int, int]:
    """(all parameters, matmul weights) of one layer's tp shard: qkv and fc1 split by
    columns, proj and fc2 by rows (their biases replicated), LayerNorms replicated."""
    h, f = m.hidden_size, ffn_size(m)
    weights = (4 * h * h + 2 * h * f) // tp
    return weights + (3 * h + f) // tp + 2 * h + 4 * h, weights


def model_parameters(m: ModelConfig, vocab: int) -> int:
    """The whole model's count, tied head counted once (12·L·h² + 13·L·h + (V+S)·h + 2h
    for f = 4h and learned positions)."""
    positions = (m.max_position_embeddings or m.seq_length
                 if m.position_embedding == "learned" else 0)
    head = 0 if m.tie_embeddings else vocab * m.hidden_size
    return (m.num_layers * layer_parameters(m)[0] + (vocab + positions) * m.hidden_size
            + 2 * m.hidden_size + head)


@dataclass
class ChunkShape:
    """One model chunk of a stage: its layers and what else it holds."""

    layers: tuple[int, int]  # [first, last)
    embedding: bool
    head: bool  # final norm + output layer + loss
    own_head_weight: bool  # an output layer of its own (untied, or apart from the embedding)

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


def split_summary(cfg: Config, padded_vocab: int) -> str:
    """How ``pipeline.layers_per_stage`` split the layers, each (virtual) stage's FLOPs
    per token over the mean, and, for another split, the even split's max/mean."""
    par, lps = cfg.parallel, cfg.pipeline.layers_per_stage
    virtual = par.pipeline * par.virtual_pipeline
    costs = part_costs(cfg.model, padded_vocab)
    sizes = resolve_sizes(cfg.model.num_layers, virtual, lps, costs)
    how = ("even" if lps is None else "balanced by FLOPs, embedding and output layer "
           "included" if lps == AUTO else "by hand")
    out = (f"(pipeline.layers_per_stage={'null' if lps is None else lps}: {how}) "
           + ("per virtual stage " if par.virtual_pipeline > 1 else "")
           + describe_split(sizes, costs))
    if lps is not None:
        even = resolve_sizes(cfg.model.num_layers, virtual, None)
        out += f"; the even split {even}: max/mean {max_over_mean(even, costs):.2f}"
    return out


def stage_chunks(cfg: Config, spec: ScheduleSpec, padded_vocab: int) -> list[list[ChunkShape]]:
    """Per pipeline rank, its chunks as this schedule builds them (a tied head is untied
    across stages by the asynchronous schedules: ``spec.stage_model_config``)."""
    par = cfg.parallel
    model = spec.stage_model_config(cfg.model, par.pipeline)
    out = []
    for s, ranges in enumerate(chunk_layers(cfg.model.num_layers, par.pipeline,
                                            par.virtual_pipeline, cfg.pipeline.layers_per_stage,
                                            part_costs(cfg.model, padded_vocab))):
        pre, post = s == 0, s == par.pipeline - 1
        chunks = []
        for c, r in enumerate(ranges):
            emb = pre and c == 0
            head = post and c == len(ranges) - 1
            chunks.append(ChunkShape(tuple(r), emb, head,
                                     head and not (model.tie_embeddings and pre)))
        out.append(chunks)
    return out


def chunk_parameters(m: ModelConfig, chunk: ChunkShape, vocab: int, tp: int) -> tuple[int, int]:
    """(all parameters, matmul weights autocast casts) of one chunk's tp shard."""
    per_layer, per_layer_w = layer_parameters(m, tp)
    n, w = chunk.num_layers * per_layer, chunk.num_layers * per_layer_w
    h = m.hidden_size
    if chunk.embedding:
        positions = (m.max_position_embeddings or m.seq_length
                     if m.position_embedding == "learned" else 0)
        n += vocab * h // tp + positions * h
    if chunk.head:
        n += 2 * h
        w += vocab * h // tp  # the head's matmul casts its weight, tied or not
        if chunk.own_head_weight:
            n += vocab * h // tp
    return n, w


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------
@dataclass
class StageMemory:
    stage: int
    parameters: int
    weights: float
    grads: float
    optimizer: float
    extra_copies: float
    activations: float
    weight_casts: float  # autocast's bf16 weight copies the in-flight micro-batches keep
    in_flight: int  # most micro-batch chunks holding activations at once

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.extra_copies
                + self.activations + self.weight_casts)


@dataclass
class SchedulePlan:
    name: str
    title: str
    problem: str | None  # why it cannot run this layout (validate_layout's error)
    stages: list[StageMemory] = field(default_factory=list)
    bubble: float = math.nan
    steady_bubble: float = math.nan

    @property
    def worst(self) -> StageMemory | None:
        return max(self.stages, key=lambda st: st.total) if self.stages else None


@dataclass
class Plan:
    cfg: Config
    world: int
    gpu_memory_gib: float
    dp: int
    window: int
    vocab: int
    padded_vocab: int
    parameters: int
    flops_per_token: float
    saved: SavedBytes
    layer_bytes: float
    megatron_layer_bytes: float
    schedules: list[SchedulePlan]

    @property
    def usable_bytes(self) -> float:
        return FIT_SHARE * self.gpu_memory_gib * GIB

    @property
    def chosen(self) -> SchedulePlan:
        return next(sp for sp in self.schedules if sp.name == self.cfg.pipeline.schedule)


def _vocab(cfg: Config) -> int:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    from megatron_paci.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.vocab_size is not set and data.tokenizer="
                          f"{cfg.data.tokenizer!r} cannot be read ({e}); set "
                          "model.vocab_size for a dry run") from None


def _peak_in_flight(spec: ScheduleSpec, stages: int, stage: int, window: int, chunks: int,
                    chunk_bytes: list[tuple[float, float]]) -> tuple[float, float, int]:
    """Walk the stage's action list: a forward adds its chunk's (activation, weight-cast)
    bytes, its backward frees them. Returns both at the peak of their sum and the most
    micro-batch chunks in flight. Enough windows that the warm-up fills the pipe even
    when a window is shorter than the pipeline."""
    windows = max(2, math.ceil(stages * chunks / window) + 1)
    act = cast = 0.0
    peak = (0.0, 0.0)
    count = peak_count = 0
    for a in spec.actions(stages, stage, window, windows, 1, chunks):
        sign = {"F": 1, "B": -1}.get(a.kind, 0)
        act += sign * chunk_bytes[a.chunk][0]
        cast += sign * chunk_bytes[a.chunk][1]
        count += sign
        if act + cast > sum(peak):
            peak = (act, cast)
        peak_count = max(peak_count, count)
    return peak[0], peak[1], peak_count


def _schedule_plan(cfg: Config, spec: ScheduleSpec, world: int, vocab: int,
                   sb: SavedBytes) -> SchedulePlan:
    plan = SchedulePlan(spec.name, spec.title, None)
    try:
        dp = validate_layout(cfg, world)
    except ParallelConfigError as e:
        plan.problem = str(e)
        return plan
    par, t, m = cfg.parallel, cfg.train, cfg.model
    tp, pp, v, sp = par.tensor, par.pipeline, par.virtual_pipeline, par.sequence_parallel
    window = t.global_batch_size // (t.micro_batch_size * dp)
    layer = layer_activation_bytes(m, t.micro_batch_size, tp, sp, sb)
    for s, chunks in enumerate(stage_chunks(cfg, spec, vocab)):
        counts = [chunk_parameters(m, c, vocab, tp) for c in chunks]
        n = sum(c[0] for c in counts)
        chunk_bytes = []
        for c, (_, w) in zip(chunks, counts, strict=True):
            b = c.num_layers * layer
            if c.embedding:
                b += embedding_activation_bytes(m, t.micro_batch_size, tp, sp, sb)
            if c.head:
                b += head_activation_bytes(m, t.micro_batch_size, vocab, tp, sp, sb)
            chunk_bytes.append((b, w * sb.weight_copy))
        acts, casts, in_flight = _peak_in_flight(spec, pp, s, window, v, chunk_bytes)
        adam = ADAM_BYTES * n / (dp if cfg.optim.distributed_optimizer else 1)
        plan.stages.append(StageMemory(
            s, n, WEIGHT_BYTES * n, GRAD_BYTES * n, adam,
            (spec.weights.copies - 1) * WEIGHT_BYTES * n, acts, casts, in_flight))
    tl = simulate(spec, pp, window, BUBBLE_WINDOWS, Costs(forward=1.0 / v, backward=2.0 / v),
                  chunks=v)
    plan.bubble, plan.steady_bubble = bubble_fraction(tl), steady_state_bubble(tl)
    return plan


def make_plan(cfg: Config, world: int, gpu_memory_gib: float = 80.0,
              device: str = "cuda") -> Plan:
    """The plan for ``world`` GPUs of ``gpu_memory_gib`` GiB. Raises ParallelConfigError
    (naming the sizes) when the configured schedule cannot run this layout."""
    if world < 1:
        raise ParallelConfigError(f"--world-size must be >= 1, got {world}")
    if gpu_memory_gib <= 0:
        raise ParallelConfigError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gib}")
    # The schedule lists are checked under gloo's rules, without asking torch for CUDA:
    # the NCCL replay (pipeline/nccl_model.py) grows steeply with the window and the
    # launch runs it anyway.
    checked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cpu"))
    dp = validate_layout(checked, world)  # the configured schedule: an error stops the plan
    vocab = _vocab(cfg)
    tp = cfg.parallel.tensor
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, tp)
    sb = saved_bytes(cfg, device)
    schedules = []
    for name in schedule_names():
        other = dataclasses.replace(checked, pipeline=dataclasses.replace(cfg.pipeline,
                                                                          schedule=name))
        schedules.append(_schedule_plan(other, get_schedule(name), world, padded, sb))
    if cfg.pipeline.schedule not in schedule_names():  # a file: schedule
        schedules.append(_schedule_plan(checked, get_schedule(cfg.pipeline.schedule), world,
                                        padded, sb))
    t = cfg.train
    return Plan(
        cfg=cfg, world=world, gpu_memory_gib=gpu_memory_gib, dp=dp,
        window=t.global_batch_size // (t.micro_batch_size * dp), vocab=vocab,
        padded_vocab=padded, parameters=model_parameters(cfg.model, padded),
        flops_per_token=flops_per_token(cfg.model, padded), saved=sb,
        layer_bytes=layer_activation_bytes(cfg.model, t.micro_batch_size, tp,
                                           cfg.parallel.sequence_parallel, sb),
        megatron_layer_bytes=layer_activation_bytes(cfg.model, t.micro_batch_size, tp,
                                                    cfg.parallel.sequence_parallel),
        schedules=schedules)


def fits(plan: Plan, schedule: SchedulePlan | None = None) -> bool:
    sp = schedule or plan.chosen
    return sp.problem is None and sp.worst is not None and sp.worst.total <= plan.usable_bytes


# ---------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def non_default_keys(cfg: Config) -> list[tuple[str, object]]:
    """``section.key`` and value for every setting that differs from the defaults."""
    default = Config().to_dict()
    return [(f"{s}.{k}", v) for s, d in cfg.to_dict().items() for k, v in d.items()
            if default[s][k] != v]


def _layout_lines(plan: Plan) -> list[str]:
    cfg = plan.cfg
    tp, pp, dp = cfg.parallel.tensor, cfg.parallel.pipeline, plan.dp
    m = cfg.model
    chunks = stage_chunks(cfg, get_schedule(cfg.pipeline.schedule), plan.padded_vocab)
    lines = [f"layout: tensor {tp} x pipeline {pp} x data {dp} = world {plan.world}; "
             f"rank = tp_rank + {tp} * (dp_rank + {dp} * pp_rank)"]
    for s, cs in enumerate(chunks):
        lo, hi = s * tp * dp, (s + 1) * tp * dp - 1
        parts = []
        for c in cs:
            what = f"layers {c.layers[0]}-{c.layers[1] - 1}"
            if c.embedding:
                what = "embedding + " + what
            if c.head:
                what += " + final norm, " + ("output layer" if c.own_head_weight
                                             else "head tied to the embedding") + ", loss"
            parts.append(what)
        lines.append(f"  stage {s}: ranks {lo}-{hi}: {'; '.join(parts)}")
    if pp > 1:
        lines += textwrap.wrap("split " + split_summary(cfg, plan.padded_vocab), 96,
                               initial_indent="  ", subsequent_indent="    ")
    if plan.world <= 16:
        rows = ", ".join(f"{r['rank']} ({r['tp']},{r['dp']},{r['pp']})"
                         for r in layout_table(plan.world, tp, pp))
        lines += textwrap.wrap(f"rank (tp,dp,pp): {rows}", 96, initial_indent="  ",
                               subsequent_indent="    ")
    if tp > 1:
        f = ffn_size(m)
        heads = m.num_attention_heads // tp
        lines += textwrap.wrap(f"tensor-parallel rank r holds heads r*{heads}.."
                     f"(r+1)*{heads}-1, MLP columns r*{f // tp}.., "
                     f"vocabulary rows r*{plan.padded_vocab // tp}..; norms and row-parallel "
                     "biases are replicated"
                     + (", activations split over the sequence outside the tp region"
                        if cfg.parallel.sequence_parallel else ""),
                     96, initial_indent="  ", subsequent_indent="    ")
    return lines


def format_plan(plan: Plan, source: str = "") -> str:
    cfg, t, m = plan.cfg, plan.cfg.train, plan.cfg.model
    out = [f"dry run{f' of {source}' if source else ''}: {plan.world} GPUs of "
           f"{plan.gpu_memory_gib:g} GiB; no process group started, no GPU touched",
           "config (settings that differ from the defaults):"]
    out += [f"  {k} = {v}" for k, v in non_default_keys(cfg)]
    out += _layout_lines(plan)
    tokens = t.global_batch_size * m.seq_length
    out.append(f"model: {_count(plan.parameters)} parameters (vocabulary {plan.vocab} padded "
               f"to {plan.padded_vocab}); window {plan.window} micro-batches of "
               f"{t.micro_batch_size} per data-parallel rank, {tokens} tokens per iteration")
    out.append(f"flops: {plan.flops_per_token / 1e9:.3f} GFLOP per token (forward + backward, "
               f"training/flops.py), {plan.flops_per_token * tokens / 1e15:.2f} PFLOP per "
               f"iteration, {plan.flops_per_token * tokens * t.iters / 1e21:.2f} ZFLOP for "
               f"{t.iters} iterations")
    out.append(f"activations per layer per micro-batch: {_gib(plan.layer_bytes)} GiB "
               f"({plan.saved.name}); Megatron's 16-bit count with stored scores, "
               "s*b*h*(34 + 5*a*s/h) (/t as applies): "
               f"{_gib(plan.megatron_layer_bytes)} GiB")
    out.append(f"memory per GPU in GiB, the fullest stage (usable: {FIT_SHARE:.0%} of "
               f"{plan.gpu_memory_gib:g} GiB = {_gib(plan.usable_bytes)} GiB):")
    head = ["schedule", "stage", "params", "weights", "grads", "optimizer", "2nd copy",
            "activations", "bf16 casts", "in-flight", "total", "fits", "bubble",
            "steady bubble"]
    rows = []
    for sp in plan.schedules:
        mark = "*" if sp.name == cfg.pipeline.schedule else ""
        w = sp.worst
        if w is None:
            rows.append([sp.name + mark, "-"] + [""] * 9 + ["no", "", ""])
            continue
        rows.append([sp.name + mark, str(w.stage), _count(w.parameters), _gib(w.weights),
                     _gib(w.grads), _gib(w.optimizer), _gib(w.extra_copies),
                     _gib(w.activations), _gib(w.weight_casts), str(w.in_flight),
                     _gib(w.total),
                     "yes" if fits(plan, sp) else "no", f"{sp.bubble:.1%}",
                     "-" if math.isnan(sp.steady_bubble) else f"{sp.steady_bubble:.1%}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [head, *rows]]
    for sp in plan.schedules:
        if sp.problem:
            out.append(f"  {sp.name} cannot run this layout: {sp.problem}")
    chosen = plan.chosen
    if len(chosen.stages) > 1:
        out += textwrap.wrap(f"per stage under {chosen.name} (GiB): " + ", ".join(
            f"stage {st.stage} {_gib(st.total)} ({st.in_flight} in flight)"
            for st in chosen.stages), 96, subsequent_indent="  ")
    out.append(verdict(plan))
    return "\n".join(out)


def verdict(plan: Plan) -> str:
    """One line: whether the configured schedule's layout fits, and if not, why."""
    sp = plan.chosen
    w = sp.worst
    assert w is not None  # make_plan refuses a configured schedule that cannot run
    if fits(plan, sp):
        return (f"fits: yes, pipeline.schedule={sp.name} needs {_gib(w.total)} GiB on its "
                f"fullest GPU (stage {w.stage}) of {_gib(plan.usable_bytes)} GiB usable")
    parts = {"activations": w.activations, "optimizer state": w.optimizer,
             "weights + gradients": w.weights + w.grads, "2BW's second copy": w.extra_copies,
             "bf16 weight casts": w.weight_casts}
    biggest = max(parts, key=parts.get)
    hint = {
        "activations": "lower train.micro_batch_size, or raise parallel.tensor (with "
                       "parallel.sequence_parallel=true) or parallel.pipeline",
        "optimizer state": "set optim.distributed_optimizer=true or raise parallel.tensor / "
                           "parallel.pipeline",
        "weights + gradients": "raise parallel.tensor or parallel.pipeline",
        "2BW's second copy": "raise parallel.tensor or parallel.pipeline",
        "bf16 weight casts": "every in-flight micro-batch keeps autocast's bf16 copy of the "
                             "stage's matmul weights, whatever the micro-batch size: raise "
                             "parallel.tensor, or make room with "
                             "optim.distributed_optimizer=true",
    }[biggest]
    return (f"fits: no, pipeline.schedule={sp.name} needs {_gib(w.total)} GiB on stage "
            f"{w.stage} > {_gib(plan.usable_bytes)} GiB usable ({FIT_SHARE:.0%} of "
            f"{plan.gpu_memory_gib:g} GiB); the largest part is {biggest} "
            f"({_gib(parts[biggest])} GiB, {w.in_flight} micro-batch(es) in flight): {hint}")
