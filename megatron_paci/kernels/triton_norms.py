"""Fused Triton LayerNorm and RMSNorm with hand-written backward passes.

Only imported when the ``triton`` kernel backend is selected, so ``triton`` is
imported at top level here; nothing else in the package imports this module
eagerly.

Layout: inputs are flattened to ``[M, N]`` (``N`` = hidden). Each forward
program normalises a tile of ``BLOCK_M`` rows with statistics in fp32 and saves
them for backward. Each backward program walks a fixed, contiguous range of
rows, writes ``dx`` per row and accumulates its share of ``dweight``/``dbias``
in registers; the per-program partials land in a ``[num_blocks, N]`` fp32
buffer that is summed afterwards, so weight gradients are deterministic (no
atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows of registers one program holds at most: above this the tile would spill.
_MAX_TILE = 4096
_MAX_BLOCK_M = 16
# Largest hidden size whose row fits in one tile (fp32 registers, as in apex).
_MAX_BLOCK_N = 65536


@triton.jit
def _layer_norm_fwd(X, W, B, Y, Mean, Rstd, M, N, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd(X, W, DY, DX, Mean, Rstd, DW, DB, M, N, rows_per_prog,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = start + i + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW + pid * N + cols, dw, mask=col_mask)
    tl.store(DB + pid * N + cols, db, mask=col_mask)


@triton.jit
def _rms_norm_fwd(X, W, Y, Rstd, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd(X, W, DY, DX, Rstd, DW, M, N, rows_per_prog,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = start + i + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DW + pid * N + cols, dw, mask=col_mask)


def _tile(n: int) -> tuple[int, int, int]:
    """Pick (BLOCK_M, BLOCK_N, num_warps): whole rows per tile, several rows when narrow."""
    block_n = triton.next_power_of_2(n)
    if block_n > _MAX_BLOCK_N:
        raise ValueError(f"hidden size {n} exceeds the fused norm limit of {_MAX_BLOCK_N}")
    block_m = max(1, min(_MAX_BLOCK_M, _MAX_TILE // block_n))
    elems = block_m * block_n
    num_warps = 4 if elems <= 4096 else 8 if elems <= 16384 else 16
    return block_m, block_n, num_warps


def _bwd_split(m: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """Split ``m`` rows into (num_blocks, rows_per_prog) for the backward pass.

    Few programs keep the partial-sum buffer and its final reduction small; on a GPU
    a few per SM keeps it busy, in the CPU interpreter each program costs ~1 ms.
    """
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 8
    tiles = triton.cdiv(m, block_m)
    rows_per_prog = triton.cdiv(tiles, min(tiles, cap)) * block_m
    return triton.cdiv(m, rows_per_prog), rows_per_prog


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
        x2 = _flat(x)
        w = weight.contiguous()
        b = bias.contiguous()
        m, n = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block_m, block_n, num_warps = _tile(n)
        if m > 0:
            _layer_norm_fwd[(triton.cdiv(m, block_m),)](
                x2, w, b, y, mean, rstd, m, n, eps,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.shape = x.shape
        ctx.bias_dtype = bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = _flat(dy)
        dx = torch.empty_like(x2)
        block_m, block_n, num_warps = _tile(n)
        num_blocks, rows_per_prog = _bwd_split(max(m, 1), block_m, x2.device)
        dw_part = torch.zeros(num_blocks, n, dtype=torch.float32, device=x2.device)
        db_part = torch.zeros(num_blocks, n, dtype=torch.float32, device=x2.device)
        if m > 0:
            _layer_norm_bwd[(num_blocks,)](
                x2, w, dy2, dx, mean, rstd, dw_part, db_part, m, n, rows_per_prog,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        dw = dw_part.sum(0).to(w.dtype)
        db = db_part.sum(0).to(ctx.bias_dtype)
        return dx.view(ctx.shape), dw, db, None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _flat(x)
        w = weight.contiguous()
        m, n = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block_m, block_n, num_warps = _tile(n)
        if m > 0:
            _rms_norm_fwd[(triton.cdiv(m, block_m),)](
                x2, w, y, rstd, m, n, eps,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = _flat(dy)
        dx = torch.empty_like(x2)
        block_m, block_n, num_warps = _tile(n)
        num_blocks, rows_per_prog = _bwd_split(max(m, 1), block_m, x2.device)
        dw_part = torch.zeros(num_blocks, n, dtype=torch.float32, device=x2.device)
        if m > 0:
            _rms_norm_bwd[(num_blocks,)](
                x2, w, dy2, dx, rstd, dw_part, m, n, rows_per_prog,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        return dx.view(ctx.shape), dw_part.sum(0).to(w.dtype), None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of ``x``; stats in fp32, output in ``x.dtype``.

    ``weight``/``bias`` may be fp32 with a bf16 ``x`` (mixed precision); their grads
    come back in their own dtypes.
    """
    return _LayerNorm.apply(x, weight, bias, float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x``; stats in fp32, output in ``x.dtype``."""
    return _RMSNorm.apply(x, weight, float(eps))
