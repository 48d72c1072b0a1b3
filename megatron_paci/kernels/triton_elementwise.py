"""Fused Triton element-wise ops: bias+GeLU, bias+dropout+add, rotary embedding.

Each op is a ``torch.autograd.Function`` whose forward and backward are Triton kernels,
so the intermediate ``x + bias`` (and the dropout mask) never round-trips through
memory. Kernels compute in fp32 and store in the activation dtype; ``bias`` may be
fp32 while ``x`` is bf16. Semantics match ``megatron_paci.kernels.reference``.

Activations are viewed as ``[rows, n]`` (any leading dims). Column blocks are the next
power of two of ``n`` (capped), with masks for odd sizes. ``dbias`` is reduced
deterministically: every program writes an fp32 partial sum for its own group of rows,
and the partials are summed afterwards in a fixed order (no atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["bias_gelu", "bias_dropout_add", "rotary"]

# Column tile cap and target elements per tile: big enough to keep a GPU busy, small
# enough that the interpreter (tests on CPU) runs only a handful of programs.
_MAX_BLOCK_N = 1024
_TILE_ELEMS = 4096
# Programs for the backward kernels with a dbias reduction (row groups x column
# blocks): a few per SM on a GPU, so enough bytes are in flight to keep a memory-bound
# kernel near copy bandwidth, and few enough that the fp32 partial sums (groups x n)
# stay a small fraction of the traffic. On the CPU (interpreter) a fixed cap.
_PROGRAMS_PER_SM = 4
_CPU_MAX_PROGRAMS = 256

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------- helpers


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """Contiguous ``[rows, n]`` view: the kernels index with plain row-major offsets."""
    t = t.contiguous()
    return t.view(-1, t.shape[-1]) if t.dim() > 0 else t.view(1, 1)


def _tiles(m: int, n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for an ``[m, n]`` problem; both powers of two."""
    block_n = min(triton.next_power_of_2(max(n, 1)), _MAX_BLOCK_N)
    block_m = max(1, min(triton.next_power_of_2(max(m, 1)), _TILE_ELEMS // block_n))
    return block_m, block_n


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_MAX_PROGRAMS


def _row_groups(m: int, block_m: int, n_col_blocks: int,
                device: torch.device) -> tuple[int, int]:
    """(groups, row blocks per group) for the backward kernels with a dbias reduction."""
    row_blocks = triton.cdiv(max(m, 1), block_m)
    max_groups = max(1, _max_programs(device) // n_col_blocks)
    per_group = triton.cdiv(row_blocks, min(row_blocks, max_groups))
    return triton.cdiv(row_blocks, per_group), per_group


def _check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")


@triton.jit
def _tanh(z):
    # tl has no tanh in every backend (interpreter included). exp(-2|z|) lies in (0, 1],
    # so nothing overflows and large |z| saturates to exactly +-1.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


# --------------------------------------------------------------------------- bias + GeLU


@triton.jit
def _bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, M, N, K0: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    u = x + b[None, :]
    t = _tanh(K0 * (u + 0.044715 * u * u * u))
    y = 0.5 * u * (1.0 + t)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(g_ptr, x_ptr, b_ptr, dx_ptr, part_ptr, M, N, ROW_BLOCKS_PER_PROG,
                          K0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid_g * ROW_BLOCKS_PER_PROG * BLOCK_M
    for i in range(0, ROW_BLOCKS_PER_PROG):
        rows = row0 + i * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = x + b[None, :]
        u2 = u * u
        t = _tanh(K0 * (u + 0.044715 * u2 * u))
        # d/du [0.5 u (1 + tanh(k (u + c u^3)))]
        dgelu = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * K0 * (1.0 + 3.0 * 0.044715 * u2)
        dx = g * dgelu
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        # masked lanes loaded g = 0, so they add nothing
        acc += tl.sum(dx, axis=0)
    tl.store(part_ptr + pid_g.to(tl.int64) * N + cols, acc, mask=cmask)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        _check_bias(bias, n)
        x2 = _as_rows(x)
        b = bias.contiguous()
        m = x2.shape[0]
        y = torch.empty_like(x2)
        bm, bn = _tiles(m, n)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        if x2.numel() > 0:
            _bias_gelu_fwd_kernel[grid](x2, b, y, m, n, K0=_SQRT_2_OVER_PI,
                                        BLOCK_M=bm, BLOCK_N=bn)
        # Recompute x + bias in backward instead of saving it: one tensor less in memory.
        ctx.save_for_backward(x2, b)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, b = ctx.saved_tensors
        m, n = x2.shape
        g = grad.contiguous().view(m, n)
        dx = torch.empty_like(x2)
        bm, bn = _tiles(m, n)
        n_col = triton.cdiv(n, bn)
        groups, per_group = _row_groups(m, bm, n_col, g.device)
        part = torch.empty((groups, n), dtype=torch.float32, device=x2.device)
        if x2.numel() > 0:
            _bias_gelu_bwd_kernel[(groups, n_col)](g, x2, b, dx, part, m, n, per_group,
                                                   K0=_SQRT_2_OVER_PI, BLOCK_M=bm, BLOCK_N=bn)
            dbias = part.sum(0)
        else:
            dbias = torch.zeros(n, dtype=torch.float32, device=x2.device)
        return dx.view(ctx.x_shape), dbias.to(b.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Tanh-approximate GeLU of ``x + bias`` (``x`` ``[..., n]``, ``bias`` ``[n]`` or
    ``None``).

    Output has ``x``'s dtype; gradients flow to ``x`` and ``bias``.
    """
    if bias is None:  # the same signature as every backend's; the model passes its bias
        bias = x.new_zeros(x.shape[-1])
    return _BiasGelu.apply(x, bias)


# --------------------------------------------------------------------------- bias + dropout + add


@triton.jit
def _bda_fwd_kernel(x_ptr, b_ptr, r_ptr, y_ptr, M, N, seed, p, scale,
                    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        h = h + b[None, :]
    if DROPOUT:
        # The mask is a pure function of (seed, element offset): backward regenerates it.
        keep = tl.rand(seed, offs) >= p
        h = tl.where(keep, h * scale, 0.0)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (r + h).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bda_bwd_kernel(g_ptr, dx_ptr, part_ptr, M, N, ROW_BLOCKS_PER_PROG, seed, p, scale,
                    DROPOUT: tl.constexpr, NEED_DBIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid_g * ROW_BLOCKS_PER_PROG * BLOCK_M
    for i in range(0, ROW_BLOCKS_PER_PROG):
        rows = row0 + i * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = tl.rand(seed, offs) >= p
            g = tl.where(keep, g * scale, 0.0)
        tl.store(dx_ptr + offs, g.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DBIAS:
            acc += tl.sum(g, axis=0)
    if NEED_DBIAS:
        tl.store(part_ptr + pid_g.to(tl.int64) * N + cols, acc, mask=cmask)


class _BiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                p: float, dropout: bool, seed: int) -> torch.Tensor:
        n = x.shape[-1]
        _check_bias(bias, n)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
        x2 = _as_rows(x)
        r2 = _as_rows(residual)
        b = bias.contiguous() if bias is not None else x2  # dummy pointer when no bias
        m = x2.shape[0]
        # An fp32 residual stream stays fp32; otherwise the activation dtype.
        out_dtype = torch.promote_types(x.dtype, residual.dtype)
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        bm, bn = _tiles(m, n)
        if x2.numel() > 0:
            _bda_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
                x2, b, r2, y, m, n, seed, p, scale, HAS_BIAS=bias is not None,
                DROPOUT=dropout, BLOCK_M=bm, BLOCK_N=bn)
        ctx.meta = (m, n, seed, p, scale, dropout, x.shape, x.dtype, residual.dtype,
                    None if bias is None else bias.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m, n, seed, p, scale, dropout, x_shape, x_dtype, r_dtype, b_dtype = ctx.meta
        need_dx = ctx.needs_input_grad[0]
        need_db = b_dtype is not None and ctx.needs_input_grad[1]
        dx = dbias = None
        if need_dx or need_db:
            g = grad.contiguous().view(m, n)
            dx_buf = torch.empty((m, n), dtype=x_dtype, device=grad.device)
            bm, bn = _tiles(m, n)
            n_col = triton.cdiv(n, bn)
            groups, per_group = _row_groups(m, bm, n_col, g.device)
            part = torch.zeros((groups if need_db else 1, n), dtype=torch.float32,
                               device=grad.device)
            if m * n > 0:
                _bda_bwd_kernel[(groups, n_col)](
                    g, dx_buf, part, m, n, per_group, seed, p, scale, DROPOUT=dropout,
                    NEED_DBIAS=need_db, BLOCK_M=bm, BLOCK_N=bn)
            if need_dx:
                dx = dx_buf.view(x_shape)
            if need_db:
                dbias = part.sum(0).to(b_dtype)
        dres = grad.to(r_dtype) if ctx.needs_input_grad[2] else None
        return dx, dbias, dres, None, None, None


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                     p: float, training: bool, seed: int | None = None) -> torch.Tensor:
    """``residual + dropout(x + bias, p)`` in one pass (``bias`` ``[n]`` or ``None``).

    The keep-mask comes from Philox (``tl.rand``) on ``(seed, element offset)``, so it is
    never stored and backward regenerates it. With ``seed=None`` the seed is drawn from
    torch's default CPU generator, so ``torch.manual_seed`` and a restored RNG state
    reproduce the masks. ``p == 0`` or ``training=False`` gives exactly
    ``x + bias + residual`` (fp32 arithmetic, one rounding to the output dtype).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    dropout = bool(training) and p > 0.0
    if dropout and seed is None:
        # Always the CPU default generator: reproducible from torch.manual_seed and from
        # a checkpointed torch RNG state, independent of the device.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return _BiasDropoutAdd.apply(x, bias, residual, float(p), dropout,
                                 int(seed) if dropout else 0)


# --------------------------------------------------------------------------- rotary


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, ROWS, S, HALF,
                   BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < ROWS) & (cols[None, :] < HALF)
    d = 2 * HALF
    # x rows are (..., s) flattened; the table row is the position s.
    xo = rows.to(tl.int64)[:, None] * d + cols[None, :]
    to = (rows % S).to(tl.int64)[:, None] * d + cols[None, :]
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + to, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + to + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + to, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + to + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the forward map; with the usual duplicated-halves tables
        # (c1 == c2, s1 == s2) this is the rotation by -theta.
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr + xo, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + xo + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def _rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   backward: bool) -> torch.Tensor:
    s, d = x.shape[-2], x.shape[-1]
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    rows = x2.numel() // d if d else 0
    if rows == 0:
        return y
    half = d // 2
    block_h = triton.next_power_of_2(half)
    block_r = max(1, min(triton.next_power_of_2(rows), _TILE_ELEMS // (2 * block_h)))
    _rotary_kernel[(triton.cdiv(rows, block_r),)](x2, cos, sin, y, rows, s, half,
                                                  BACKWARD=backward, BLOCK_R=block_r,
                                                  BLOCK_H=block_h)
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError("rotary expects x [..., s, d]")
        s, d = x.shape[-2], x.shape[-1]
        if d % 2:
            raise ValueError(f"rotary needs an even head dim, got {d}")
        if cos.numel() != s * d or sin.numel() != s * d:
            raise ValueError(f"cos/sin must hold [{s}, {d}] values, got "
                             f"{tuple(cos.shape)} / {tuple(sin.shape)}")
        c = cos.contiguous().view(s, d)
        sn = sin.contiguous().view(s, d)
        ctx.save_for_backward(c, sn)
        return _rotary_launch(x, c, sn, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c, sn = ctx.saved_tensors
        # cos/sin are fixed position tables: no gradient for them.
        return _rotary_launch(grad, c, sn, backward=True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x`` ``[..., s, d]`` with ``cos``/``sin`` ``[s, d]`` tables.

    Rotates the two halves of the last dim (GPT-NeoX / Megatron layout); ``cos``/``sin``
    are treated as constants (no gradient).
    """
    return _Rotary.apply(x, cos, sin)
