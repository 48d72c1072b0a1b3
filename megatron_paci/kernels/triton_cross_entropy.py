"""Fused (vocab-parallel) cross-entropy in Triton: the loss without fp32 copies of the logits.

The torch path (``tensor_parallel/cross_entropy.py``) upcasts the ``tokens x V``
logits to fp32 and keeps an fp32 softmax for backward: two fp32 logits-sized
buffers next to the bf16 logits, and a third (the fp32 grad) in backward. Here

* the forward kernel streams each row in ``BLOCK_V`` chunks, keeping an online
  max / sum-of-exp in fp32 registers, and loads the target logit when this
  rank owns it; only three fp32 numbers per row reach memory;
* across tensor-parallel ranks the per-row numbers are combined as Megatron
  does: global max (gathered, since ``comm`` only sums), local sums rescaled to
  it, then one SUM all-reduce of (sum_exp, target_logit);
* backward recomputes ``softmax - onehot`` chunk by chunk from the saved logits
  and two per-row fp32 values (global max, log of the sum of exps relative to it)
  and writes the gradient in the logits' dtype -- into the logits' own storage
  with ``inplace_backward=True``, so the only logits-sized buffer is the one the
  model already holds.

Targets must lie in ``[0, V)`` (no ``ignore_index``; use a loss mask).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_paci.parallel import comm

KIND = "tp"
DEFAULT_BLOCK_V = 1024


@triton.jit
def _ce_forward_kernel(logits_ptr, target_ptr, max_ptr, sumexp_ptr, tlogit_ptr,
                       stride_row, n_cols, vocab_start, BLOCK_V: tl.constexpr):
    """One program per row: online max / sum-exp over the shard, and the target logit."""
    row = tl.program_id(0).to(tl.int64)  # int64: tokens x V can exceed 2**31
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # exp(-inf) = 0 both for masked lanes and for the initial (empty) sum.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new

    local_t = tl.load(target_ptr + row) - vocab_start
    owned = (local_t >= 0) & (local_t < n_cols)
    safe_t = tl.where(owned, local_t, 0)
    t_logit = tl.load(row_ptr + safe_t, mask=owned, other=0.0).to(tl.float32)

    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)
    tl.store(tlogit_ptr + row, t_logit)


@triton.jit
def _ce_backward_kernel(logits_ptr, grad_ptr, target_ptr, max_ptr, logsum_ptr, dloss_ptr,
                        stride_row, stride_grad_row, n_cols, vocab_start,
                        BLOCK_V: tl.constexpr):
    """One program per row: grad = (softmax - onehot) * dloss, chunk by chunk.

    Each chunk is read before it is written by the same program, so ``grad_ptr``
    may equal ``logits_ptr``.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    cols = tl.arange(0, BLOCK_V)

    m = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    g = tl.load(dloss_ptr + row)
    local_t = tl.load(target_ptr + row) - vocab_start

    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp((x - m) - log_s)  # x - m first: exact even for large logits
        p = tl.where(offs == local_t, p - 1.0, p)  # never matches off-shard targets
        tl.store(grad_row_ptr + offs, (p * g).to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(n_cols: int, block_v: int | None) -> int:
    if block_v is None:
        return min(DEFAULT_BLOCK_V, triton.next_power_of_2(max(n_cols, 1)))
    if block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"cross_entropy: block_v must be a power of two, got {block_v}")
    return block_v


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, block_v, inplace_backward):
        n_cols = logits.shape[-1]
        x = logits.reshape(-1, n_cols)
        if x.stride(-1) != 1:
            x = x.contiguous()
        t = target.reshape(-1).to(torch.int64).contiguous()
        rows = x.shape[0]
        stats = torch.empty((3, rows), dtype=torch.float32, device=x.device)
        local_max, sum_exp, t_logit = stats[0], stats[1], stats[2]
        if rows:
            _ce_forward_kernel[(rows,)](x, t, local_max, sum_exp, t_logit, x.stride(0),
                                        n_cols, vocab_start, BLOCK_V=block_v,
                                        num_warps=_num_warps(block_v))

        if comm.group_size(group) > 1:
            gathered = comm.all_gather(local_max.unsqueeze(0), group, KIND, dim=0)
            global_max = gathered.amax(dim=0)
            # A rank whose max is below the global one rescales its sum to it.
            sums = torch.stack((sum_exp * torch.exp(local_max - global_max), t_logit))
            comm.all_reduce(sums, group, KIND)  # only the owning rank adds a target logit
            sum_exp, t_logit = sums[0], sums[1]
        else:
            global_max = local_max

        log_s = torch.log(sum_exp)
        loss = log_s - (t_logit - global_max)
        ctx.save_for_backward(x, t, global_max, log_s)
        ctx.meta = (logits.shape, vocab_start, block_v, inplace_backward)
        ctx.consumed = False
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        shape, vocab_start, block_v, inplace = ctx.meta
        if ctx.consumed:
            raise RuntimeError("fused cross_entropy: backward ran twice with inplace_backward=True;"
                               " the saved logits were overwritten by the first gradient")
        x, t, global_max, log_s = ctx.saved_tensors
        g = grad_loss.reshape(-1).to(torch.float32).contiguous()
        grad = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        ctx.consumed = inplace
        if x.shape[0]:
            _ce_backward_kernel[(x.shape[0],)](x, grad, t, global_max, log_s, g,
                                               x.stride(0), grad.stride(0), x.shape[1],
                                               vocab_start, BLOCK_V=block_v,
                                               num_warps=_num_warps(block_v))
        return grad.view(shape), None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                  vocab_start: int | None = None, block_v: int | None = None,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Per-token fp32 loss ``[...]`` from logits ``[..., V_local]`` and global targets ``[...]``.

    ``logits`` is this rank's vocabulary shard, rows ``[vocab_start, vocab_start +
    V_local)`` (default ``rank * V_local``) when ``group`` has more than one rank.
    ``block_v`` (a power of two) is the chunk each program streams; default
    ``min(1024, next_pow2(V_local))``. ``inplace_backward=True`` writes the logits
    gradient over the logits: pass it only when nothing else reads the logits
    after the loss (their producer's backward, e.g. a matmul's, does not).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} disagree on the leading dims")
    if vocab_start is None:
        vocab_start = comm.group_rank(group) * logits.shape[-1]
    block = _block_v(logits.shape[-1], block_v)
    return _FusedCrossEntropy.apply(logits, target, group, int(vocab_start), block,
                                    inplace_backward)
