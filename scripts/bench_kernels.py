"""Time every fused op against torch eager, torch.compile and apex, and report bandwidth.

Why this exists: the Triton kernels are worth keeping only if they move bytes near the
speed of a plain device copy and, for the cross-entropy, hold far less memory than the
torch path. Each op runs at GPT-2 Medium and GPT-3 1.3B shapes in bf16 (parameters in
fp32, as under autocast), forward alone and forward + backward. For each it reports the
median time, the bytes the op must move (formula per op, printed with the table), the
achieved GB/s as a fraction of the measured ``y.copy_(x)`` bandwidth, and the peak memory
of one forward + backward.

On a GPU every call is captured in a CUDA graph (so Python launch overhead is not timed)
and timed with CUDA events, after a 256 MiB write that evicts the L2 cache; if capture
fails the call is timed eagerly and the row says so.

    python scripts/bench_kernels.py --output docs/kernels_gpu.md   # one GPU, a few minutes
    python scripts/bench_kernels.py --smoke                          # CPU, seconds, torch only
    python scripts/bench_kernels.py --sweep-norm-tiles               # LayerNorm/RMSNorm tiles

``--smoke`` runs tiny shapes on the CPU with ``time.perf_counter``, torch eager only
(plus Triton through the interpreter when ``TRITON_INTERPRET=1`` is set): it only keeps
the code path alive, its numbers mean nothing.

``--sweep-norm-tiles`` times the Triton LayerNorm and RMSNorm at the first shape under
every tile (rows per program x warps) instead, the tile the kernels pick marked: the
backward keeps a whole tile of fp32 values per thread, so the tile decides registers,
occupancy and bandwidth, and only a GPU can say which is fastest.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_paci.kernels import reference  # noqa: E402
from megatron_paci.kernels.dispatch import (  # noqa: E402
    COVERS,
    OPS,
    KernelError,
    apex_status,
    select_kernels,
    triton_status,
)

FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2: each timed call starts cold
COPY_ELEMS = 2**29  # 1 GiB of bf16 for the copy-bandwidth reference
TARGET_FRACTION = 0.80  # memory-bound kernels: at least this fraction of copy bandwidth
TARGET_CE_RATIO = 0.25  # fused cross-entropy peak memory over torch's, at most


@dataclass(frozen=True)
class Shape:
    """One model's activation sizes (T = seq x micro-batch tokens)."""

    name: str
    hidden: int
    ffn: int
    heads: int
    seq: int
    batch: int
    vocab: int
    layers: int = 2

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def param_shapes(self) -> list[tuple[int, ...]]:
        """The GPT's parameter tensors (untied head left out), for the AdamW step."""
        h, f = self.hidden, self.ffn
        layer = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (f, h), (f,),
                 (h, f), (h,)]
        return [(self.vocab, h), (self.seq, h)] + layer * self.layers + [(h,), (h,)]


SHAPES = (
    # GPT-2 Medium: vocabulary 50257 padded to a multiple of 128.
    Shape("gpt2-medium", hidden=1024, ffn=4096, heads=16, seq=1024, batch=8, vocab=50304,
          layers=24),
    Shape("gpt3-1.3b", hidden=2048, ffn=8192, heads=16, seq=2048, batch=4, vocab=50304,
          layers=24),
)
SMOKE_SHAPES = (Shape("smoke", hidden=64, ffn=256, heads=4, seq=16, batch=2, vocab=512),)

# Bytes each op must move, e = activation element size (2 for bf16). Small terms
# (fp32 weights/biases and their grads, per-row statistics, targets, losses) are left
# out except the rotary tables, which are read whole on every call.
FORMULAS = {
    "layer_norm": "fwd: read x, write y = 2·T·h·e; bwd: read x, dy, write dx = 3·T·h·e",
    "rms_norm": "fwd: read x, write y = 2·T·h·e; bwd: read x, dy, write dx = 3·T·h·e",
    "bias_gelu": "fwd: read x, write y = 2·T·f·e; bwd: read x, dy, write dx = 3·T·f·e "
                 "(x + bias recomputed, never stored)",
    "bias_dropout_add": "fwd: read x, residual, write y = 3·T·h·e; bwd: read dy, write dx = "
                        "2·T·h·e (mask regenerated from the seed; d residual is dy itself)",
    "rotary": "fwd: read x, write y = 2·T·h·e + cos, sin tables 2·s·d·4; bwd: the same",
    "cross_entropy": "fwd: read logits = T·V·e; bwd: read logits, write dlogits = 2·T·V·e",
    "adamw": "step: read parameter, gradient, exp_avg, exp_avg_sq and write parameter, "
             "exp_avg, exp_avg_sq = 7·N·4 (N parameters, all fp32)",
}
ACTIVATION_OPS = tuple(op for op in OPS if op != "adamw")


@dataclass
class Case:
    """Arguments of one op in the dispatcher's signature, and what moving them costs."""

    op: str
    args: tuple
    grad_idx: list[int]
    fwd_bytes: int
    bwd_bytes: int
    kwargs: dict = field(default_factory=dict)

    def leaves(self) -> list[torch.Tensor]:
        return [self.args[i] for i in self.grad_idx]

    def input_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.args
                   if isinstance(a, torch.Tensor))


def make_case(op: str, s: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    """Inputs laid out as the model passes them: [s, b, h] activations, fp32 parameters."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, dt: torch.dtype = dtype, grad: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)
        return t.requires_grad_(grad)

    e = torch.finfo(dtype).bits // 8
    T, h, f = s.tokens, s.hidden, s.ffn
    if op in ("layer_norm", "rms_norm"):
        x, w = rnd(s.seq, s.batch, h, grad=True), rnd(h, dt=torch.float32, grad=True)
        if op == "layer_norm":
            args, idx = (x, w, rnd(h, dt=torch.float32, grad=True), 1e-5), [0, 1, 2]
        else:
            args, idx = (x, w, 1e-5), [0, 1]
        return Case(op, args, idx, 2 * T * h * e, 3 * T * h * e)
    if op == "bias_gelu":
        args = (rnd(s.seq, s.batch, f, grad=True), rnd(f, dt=torch.float32, grad=True))
        return Case(op, args, [0, 1], 2 * T * f * e, 3 * T * f * e)
    if op == "bias_dropout_add":
        args = (rnd(s.seq, s.batch, h, grad=True), rnd(h, dt=torch.float32, grad=True),
                rnd(s.seq, s.batch, h, grad=True), 0.1, True)
        return Case(op, args, [0, 1, 2], 3 * T * h * e, 2 * T * h * e)
    if op == "rotary":
        d = s.head_dim
        angles = torch.outer(torch.arange(s.seq, device=device, dtype=torch.float32),
                             torch.rand(d // 2, generator=gen, device=device))
        cos = torch.cat([angles.cos(), angles.cos()], -1)
        sin = torch.cat([angles.sin(), angles.sin()], -1)
        args = (rnd(s.batch, s.heads, s.seq, d, grad=True), cos, sin)
        table = 2 * s.seq * d * 4
        return Case(op, args, [0], 2 * T * h * e + table, 2 * T * h * e + table)
    if op == "cross_entropy":
        logits = rnd(s.seq, s.batch, s.vocab, grad=True)
        target = torch.randint(0, s.vocab, (s.seq, s.batch), generator=gen, device=device)
        # As the model calls it: the gradient may overwrite the logits' storage.
        return Case(op, (logits, target, None), [0], T * s.vocab * e, 2 * T * s.vocab * e,
                    kwargs={"inplace_backward": True})
    raise ValueError(f"unknown op {op}")


def compiled_reference(op: str) -> Callable:
    """torch.compile of the plain reference, wrapped to the dispatcher's signature.

    The torch backend of cross_entropy is the vocab-parallel autograd function; with one
    tensor-parallel rank it is ``F.cross_entropy`` on fp32 logits, which is what
    ``reference.cross_entropy`` computes, so that is what gets compiled.
    """
    fn = torch.compile(getattr(reference, op), dynamic=False)
    if op == "bias_dropout_add":
        return lambda x, b, r, p, training, seed=None: fn(x, b, r, p, training)
    if op == "cross_entropy":
        return lambda logits, target, group=None, inplace_backward=False: fn(logits, target)
    return fn


def implementations(device: torch.device, smoke: bool, use_compile: bool
                    ) -> tuple[dict[str, Callable[[str], Callable]], list[str]]:
    """Implementation name -> (op -> callable), and a note for each one left out."""
    impls: dict[str, Callable[[str], Callable]] = {}
    notes = []
    t_ok, t_why = triton_status(device)
    if t_ok:
        triton_k = select_kernels("triton", [], device)
        impls["triton"] = lambda op: getattr(triton_k, op)
    else:
        notes.append(f"triton: not run ({t_why})")
    torch_k = select_kernels("torch", [], device)
    impls["torch"] = lambda op: getattr(torch_k, op)
    if smoke or not use_compile:
        notes.append("torch.compile: not run (" + ("--smoke" if smoke else "--no-compile") + ")")
    else:
        impls["compile"] = compiled_reference
    a_ok, a_why = apex_status("layer_norm")
    if a_ok and not smoke:
        apex_k = select_kernels("torch", ["layer_norm=apex", "rms_norm=apex"], device)
        impls["apex"] = lambda op: getattr(apex_k, op)
    else:
        notes.append(f"apex: not run ({'--smoke' if smoke else a_why})")
    return impls, notes


def adamw_implementations(device: torch.device, smoke: bool) -> dict[str, Callable]:
    """Builders in the dispatcher's ``adamw`` signature: the chosen torch path (fused on
    CUDA), torch's multi-tensor foreach path as the eager baseline, and apex."""
    impls: dict[str, Callable] = {
        "torch": select_kernels("torch", [], device).adamw,
        "foreach": lambda groups, lr, betas, eps: torch.optim.AdamW(
            groups, lr=lr, betas=betas, eps=eps, foreach=True),
    }
    if apex_status("adamw")[0] and not smoke:
        impls["apex"] = select_kernels("torch", ["adamw=apex"], device).adamw
    return impls


def bench_adamw(impl: str, build: Callable, shape: Shape, device: torch.device,
                timer: Timer) -> Row:
    """One optimizer step over the model's parameter tensors (two decay groups)."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(sh, generator=gen, device=device) for sh in shape.param_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = build(groups, 1e-4, (0.9, 0.95), 1e-8)
    opt.step()  # allocates the state outside the measurement
    n = sum(p.numel() for p in params)
    row = Row(shape.name, "adamw", impl, fwd_bytes=7 * n * 4)
    row.fwd_ms, row.method = timer(opt.step)
    return row


# ------------------------------------------------------------------------------ timing


class Timer:
    """Median milliseconds of a call: CUDA graph + events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.flush = (torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
                      if device.type == "cuda" else None)

    def __call__(self, step: Callable[[], object]) -> tuple[float, str]:
        if self.device.type != "cuda":
            for _ in range(self.warmup):
                step()
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times), "perf_counter"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(self.warmup, 3)):  # graph capture wants a warmed-up side stream
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
            run, method = graph.replay, "cuda graph"
        except Exception as e:  # not every path is capturable; time it eagerly instead
            torch.cuda.synchronize()
            run, method = step, f"eager ({type(e).__name__} in capture)"
        run()
        pairs = []
        for _ in range(self.iters):
            self.flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        ms = statistics.median(a.elapsed_time(b) for a, b in pairs)
        del graph
        return ms, method


def copy_bandwidth(device: torch.device, timer: Timer, smoke: bool) -> float:
    """Bytes per second of ``y.copy_(x)`` on a large bf16 tensor (read + write counted)."""
    n = 2**20 if smoke else COPY_ELEMS
    x = torch.randn(n, device=device).to(torch.bfloat16)
    y = torch.empty_like(x)
    ms, _ = timer(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def peak_memory(step: Callable[[], object], case: Case, device: torch.device) -> float | None:
    """Peak MiB of one forward + backward, counting the op's inputs but nothing else live."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    return (case.input_bytes() + extra) / 2**20


# ------------------------------------------------------------------------------ runs


@dataclass
class Row:
    shape: str
    op: str
    impl: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_bytes: int = 0
    fwdbwd_bytes: int = 0
    peak_mib: float | None = None
    method: str = ""
    error: str = ""

    def gbps(self, fwd: bool) -> float | None:
        ms, nbytes = ((self.fwd_ms, self.fwd_bytes) if fwd
                      else (self.fwdbwd_ms, self.fwdbwd_bytes))
        return None if not ms else nbytes / (ms * 1e-3) / 1e9


def bench_one(op: str, impl: str, fn: Callable, shape: Shape, device: torch.device,
              dtype: torch.dtype, timer: Timer) -> Row:
    case = make_case(op, shape, device, dtype)
    row = Row(shape.name, op, impl, fwd_bytes=case.fwd_bytes,
              fwdbwd_bytes=case.fwd_bytes + case.bwd_bytes)
    leaves = case.leaves()
    with torch.no_grad():
        probe = fn(*case.args, **case.kwargs)
    grad_out = torch.randn(probe.shape, device=device).to(probe.dtype)
    del probe

    def forward() -> object:
        with torch.no_grad():
            return fn(*case.args, **case.kwargs)

    def forward_backward() -> object:
        out = fn(*case.args, **case.kwargs)
        return torch.autograd.grad(out, leaves, grad_out)

    forward_backward()  # compiles (Triton JIT, torch.compile) outside the measurements
    row.peak_mib = peak_memory(forward_backward, case, device)
    row.fwdbwd_ms, method_b = timer(forward_backward)
    row.fwd_ms, method_f = timer(forward)
    row.method = method_b if method_b == method_f else f"{method_f} / {method_b}"
    return row


def _failure(shape: Shape, op: str, impl: str, e: Exception) -> Row:
    what = "compile failed" if impl == "compile" else "failed"
    msg = " ".join(str(e).split())[:80]
    return Row(shape.name, op, impl, error=f"{what}: {type(e).__name__}"
               f"{': ' + msg if msg else ''}")


def run(shapes: Sequence[Shape], ops: Sequence[str], device: torch.device, dtype: torch.dtype,
        impls: dict[str, Callable[[str], Callable]], timer: Timer,
        adamw_impls: dict[str, Callable] | None = None) -> list[Row]:
    rows = []
    for shape in shapes:
        for op in ops:
            candidates = (adamw_impls or {}) if op == "adamw" else impls
            for impl, get in candidates.items():
                if impl == "apex" and op not in COVERS["apex"]:
                    continue
                try:
                    if op == "adamw":
                        rows.append(bench_adamw(impl, get, shape, device, timer))
                    else:
                        rows.append(bench_one(op, impl, get(op), shape, device, dtype, timer))
                except Exception as e:  # report the failure in the table and go on
                    rows.append(_failure(shape, op, impl, e))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                # Progress (stderr): a run cut short by a timeout still shows its rows.
                r = rows[-1]
                print(f"bench_kernels: {shape.name} {op} {impl}: " + (r.error or (
                    f"fwd {_f(r.fwd_ms, '.4f')} ms, fwd+bwd {_f(r.fwdbwd_ms, '.4f')} ms, "
                    f"peak {_f(r.peak_mib, '.0f')} MiB")), file=sys.stderr, flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ report


def _f(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def report(rows: list[Row], shapes: Sequence[Shape], copy_bps: float, header: list[str],
           check_targets: bool = True) -> str:
    copy_gbps = copy_bps / 1e9
    out = list(header)
    out.append(f"Copy bandwidth (`y.copy_(x)`, bf16, read + write counted): "
               f"**{copy_gbps:.0f} GB/s**; \"% copy\" is achieved GB/s over this.")
    out.append("")
    out.append("Bytes each op must move (T = tokens = seq × micro-batch, h = hidden, "
               "f = ffn, V = vocabulary, s = seq, d = head dim, e = 2 bytes for bf16):")
    out.append("")
    out += [f"- `{op}`: {FORMULAS[op]}" for op in OPS]
    out.append("")
    for shape in shapes:
        out.append(f"### {shape.name}: h={shape.hidden}, ffn={shape.ffn}, heads={shape.heads}, "
                   f"seq={shape.seq}, micro-batch={shape.batch}, vocab={shape.vocab}")
        out.append("")
        out.append("| op | impl | fwd ms | fwd GB/s | fwd % copy | fwd+bwd ms | fwd+bwd GB/s "
                   "| fwd+bwd % copy | peak MiB | timing |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in (r for r in rows if r.shape == shape.name and r.op != "adamw"):
            if r.error:
                out.append(f"| {r.op} | {r.impl} | {r.error} | | | | | | | |")
                continue
            fwd, both = r.gbps(True), r.gbps(False)
            out.append(
                f"| {r.op} | {r.impl} | {_f(r.fwd_ms, '.4f')} | {_f(fwd, '.0f')} | "
                f"{_f(fwd and 100 * fwd / copy_gbps, '.0f')} | {_f(r.fwdbwd_ms, '.4f')} | "
                f"{_f(both, '.0f')} | {_f(both and 100 * both / copy_gbps, '.0f')} | "
                f"{_f(r.peak_mib, '.0f')} | {r.method} |")
        out.append("")
        out += adamw_table([r for r in rows if r.shape == shape.name and r.op == "adamw"],
                           shape, copy_gbps)
    if check_targets:
        out += targets(rows, shapes, copy_gbps)
    else:
        out += ["### Targets", "", "Not checked: a smoke run's numbers mean nothing.", ""]
    return "\n".join(out) + "\n"


def adamw_table(rows: list[Row], shape: Shape, copy_gbps: float) -> list[str]:
    if not rows:
        return []
    n = sum(math.prod(sh) for sh in shape.param_shapes())
    out = [f"AdamW step over {n:,} fp32 parameters in {len(shape.param_shapes())} "
           "tensors, two decay groups:", "",
           "| impl | step ms | GB/s | % copy | timing |", "|---|---:|---:|---:|---|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.impl} | {r.error} | | | |")
            continue
        gbps = r.gbps(True)
        out.append(f"| {r.impl} | {_f(r.fwd_ms, '.3f')} | {_f(gbps, '.0f')} | "
                   f"{_f(gbps and 100 * gbps / copy_gbps, '.0f')} | {r.method} |")
    return out + [""]


def targets(rows: list[Row], shapes: Sequence[Shape], copy_gbps: float) -> list[str]:
    """The issue's targets, checked against this run (only where Triton ran)."""
    out = ["### Targets", ""]
    triton_rows = [r for r in rows if r.impl == "triton" and not r.error]
    if not triton_rows:
        return out + ["No Triton rows in this run: targets not checked.", ""]
    for r in triton_rows:
        both = r.gbps(False)
        frac = both / copy_gbps if both else 0.0
        verdict = "meets" if frac >= TARGET_FRACTION else "misses"
        out.append(f"- {r.shape} `{r.op}` fwd+bwd at {100 * frac:.0f}% of copy bandwidth: "
                   f"{verdict} the {100 * TARGET_FRACTION:.0f}% target")
    for shape in shapes:
        fused = next((r for r in triton_rows if r.shape == shape.name
                      and r.op == "cross_entropy"), None)
        base = next((r for r in rows if r.shape == shape.name and r.op == "cross_entropy"
                     and r.impl == "torch" and not r.error), None)
        if fused is None or base is None or not fused.peak_mib or not base.peak_mib:
            out.append(f"- {shape.name} `cross_entropy` peak memory: not measured")
            continue
        ratio = fused.peak_mib / base.peak_mib
        verdict = "meets" if ratio <= TARGET_CE_RATIO else "misses"
        out.append(f"- {shape.name} `cross_entropy` at vocab {shape.vocab}: fused peak "
                   f"{fused.peak_mib:.0f} MiB vs torch {base.peak_mib:.0f} MiB, ratio "
                   f"{ratio:.3f}: {verdict} the ≤ {TARGET_CE_RATIO} target")
    out.append("")
    return out


NORM_TILES = tuple((block_m, warps) for block_m in (1, 2, 4, 8) for warps in (2, 4, 8, 16))
SMOKE_NORM_TILES = ((1, 4), (8, 4))  # the interpreter takes seconds per tile


def sweep_norm_tiles(shape: Shape, device: torch.device, dtype: torch.dtype, timer: Timer,
                     tiles: Sequence[tuple[int, int]] = NORM_TILES) -> list[Row]:
    """LayerNorm and RMSNorm under each (BLOCK_M, num_warps) tile; the picker is put back."""
    import triton

    from megatron_paci.kernels import triton_norms

    picker = triton_norms._tile
    rows = []
    try:
        for block_m, warps in tiles:
            triton_norms._tile = lambda n, m=block_m, w=warps: (m, triton.next_power_of_2(n), w)
            for op in ("layer_norm", "rms_norm"):
                impl = f"BLOCK_M={block_m}, warps={warps}"
                try:
                    rows.append(bench_one(op, impl, getattr(triton_norms, op), shape, device,
                                          dtype, timer))
                except Exception as e:  # a tile that does not compile is a row, not the end
                    rows.append(_failure(shape, op, impl, e))
                print(f"bench_kernels: tile {impl} {op}: "
                      + (rows[-1].error or f"fwd+bwd {_f(rows[-1].fwdbwd_ms, '.4f')} ms"),
                      file=sys.stderr, flush=True)
    finally:
        triton_norms._tile = picker
    block_m, _, warps = picker(shape.hidden)
    chosen = f"BLOCK_M={block_m}, warps={warps}"
    for r in rows:
        if r.impl == chosen:
            r.impl += " (picked)"
    return rows


def tile_report(rows: list[Row], shape: Shape, copy_gbps: float, header: list[str]) -> str:
    out = list(header) + [
        f"### Norm tiles at {shape.name}: {shape.seq * shape.batch} rows x h={shape.hidden}",
        "", f"Copy bandwidth: {copy_gbps:.0f} GB/s.", "",
        "| op | tile | fwd ms | fwd % copy | fwd+bwd ms | fwd+bwd % copy |",
        "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.op} | {r.impl} | {r.error} | | | |")
            continue
        fwd, both = r.gbps(True), r.gbps(False)
        out.append(f"| {r.op} | {r.impl} | {_f(r.fwd_ms, '.4f')} | "
                   f"{_f(fwd and 100 * fwd / copy_gbps, '.0f')} | {_f(r.fwdbwd_ms, '.4f')} | "
                   f"{_f(both and 100 * both / copy_gbps, '.0f')} |")
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny shapes, torch eager (+ triton if TRITON_INTERPRET=1)")
    p.add_argument("--output", help="also write the markdown report to this file")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--shapes", nargs="+", default=None,
                   help=f"subset of {', '.join(s.name for s in SHAPES)}")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 5; smoke 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 30; smoke 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--sweep-norm-tiles", action="store_true",
                   help="instead: Triton LayerNorm/RMSNorm under every tile, first shape")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device, dtype, shapes = torch.device("cpu"), torch.bfloat16, SMOKE_SHAPES
        warmup, iters = args.warmup or 1, args.iters or 2
    else:
        if not torch.cuda.is_available():
            print("bench_kernels: no CUDA device; use --smoke on a CPU", file=sys.stderr)
            return 2
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, SHAPES
        warmup, iters = args.warmup or 5, args.iters or 30
    if args.shapes:
        known = {s.name: s for s in shapes}
        unknown = [n for n in args.shapes if n not in known]
        if unknown:
            print(f"bench_kernels: unknown shape(s) {unknown}; known: {list(known)}",
                  file=sys.stderr)
            return 2
        shapes = tuple(known[n] for n in args.shapes)
    try:
        impls, notes = implementations(device, args.smoke, not args.no_compile)
    except KernelError as e:
        print(f"bench_kernels: {e}", file=sys.stderr)
        return 2
    timer = Timer(device, warmup, iters)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = [
        "## Kernel benchmark" + (" (smoke run: CPU, numbers meaningless)" if args.smoke else ""),
        "",
        f"Device: {name}; torch {torch.__version__}; activations {str(dtype).split('.')[-1]}, "
        f"parameters fp32; median of {iters} calls after {warmup} warm-up; "
        + ("CUDA graph replay timed with CUDA events, L2 flushed before each call."
           if device.type == "cuda" else "time.perf_counter."),
        "Peak MiB: one forward + backward, the op's inputs included, nothing else.",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}; "
        + ("; ".join(notes) if notes else "all implementations run") + ".",
        "",
    ]
    copy_bps = copy_bandwidth(device, timer, args.smoke)
    if args.sweep_norm_tiles:
        if "triton" not in impls:
            print(f"bench_kernels: --sweep-norm-tiles needs Triton: {'; '.join(notes)}",
                  file=sys.stderr)
            return 2
        tiles = SMOKE_NORM_TILES if args.smoke else NORM_TILES
        text = tile_report(sweep_norm_tiles(shapes[0], device, dtype, timer, tiles),
                           shapes[0], copy_bps / 1e9, header)
        print(text, end="")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)
        return 0
    rows = run(shapes, args.ops, device, dtype, impls, timer,
               adamw_implementations(device, args.smoke))
    text = report(rows, shapes, copy_bps, header, check_targets=not args.smoke)
    print(text, end="")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
