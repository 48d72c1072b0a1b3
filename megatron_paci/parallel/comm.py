"""Collectives and point-to-point through one door, so every byte is counted.

Each helper adds to ``STATS`` the bytes this rank puts on the wire, per kind
(``tp``, ``dp``, ``pp``, ``emb``), for the ring algorithms NCCL and gloo use:

    all_reduce      2 (n-1)/n x tensor bytes
    all_gather        (n-1)/n x output bytes
    reduce_scatter    (n-1)/n x input bytes
    send                   1 x tensor bytes

A helper called with ``group=None`` (size-1 group) is the identity and counts
nothing, so single-process code runs the same calls.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class CommStats:
    def __init__(self) -> None:
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, int]:
        return dict(self.bytes_sent)


STATS = CommStats()


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group, kind: str, async_op: bool = False):
    """In-place SUM all-reduce; returns the work handle when ``async_op``."""
    n = group_size(group)
    if n == 1:
        return None
    STATS.add(kind, 2 * (n - 1) / n * _nbytes(t))
    return dist.all_reduce(t, group=group, async_op=async_op)


def all_gather(t: torch.Tensor, group, kind: str, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (equal shapes on all ranks)."""
    n = group_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    if dim == 0:
        STATS.add(kind, (n - 1) / n * _nbytes(out))
        dist.all_gather_single(out, t, group=group)
        return out
    moved = t.movedim(dim, 0).contiguous()
    return all_gather(moved, group, kind, 0).movedim(0, dim).contiguous()


def all_gather_into(out: torch.Tensor, t: torch.Tensor, group, kind: str,
                    async_op: bool = False):
    """All-gather into a preallocated flat ``out`` (n x t.numel())."""
    n = group_size(group)
    if n == 1:
        out.copy_(t)
        return None
    STATS.add(kind, (n - 1) / n * _nbytes(out))
    return dist.all_gather_single(out, t, group=group, async_op=async_op)


def reduce_scatter(t: torch.Tensor, group, kind: str, dim: int = 0,
                   async_op: bool = False):
    """SUM over ranks, each rank keeping its 1/n slice along ``dim``."""
    n = group_size(group)
    if n == 1:
        return t if not async_op else (t, None)
    if dim != 0:
        moved = t.movedim(dim, 0).contiguous()
        return reduce_scatter(moved, group, kind, 0).movedim(0, dim).contiguous()
    t = t.contiguous()
    if t.shape[0] % n:
        raise ValueError(f"reduce_scatter: size {t.shape[0]} along dim 0 not divisible by {n}")
    out = torch.empty((t.shape[0] // n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    STATS.add(kind, (n - 1) / n * _nbytes(t))
    work = dist.reduce_scatter_single(out, t, group=group, async_op=async_op)
    return (out, work) if async_op else out


def post_send(t: torch.Tensor, peer: int, kind: str = "pp") -> list:
    """Post an asynchronous point-to-point send; the caller keeps ``t`` alive and
    waits on the returned works before reusing or dropping it."""
    STATS.add(kind, _nbytes(t))
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer)])


def recv(buf: torch.Tensor, peer: int) -> None:
    """Blocking point-to-point receive into ``buf`` (batched irecv, then wait)."""
    for work in dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, peer)]):
        work.wait()
