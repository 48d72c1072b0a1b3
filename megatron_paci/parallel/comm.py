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

import re
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from megatron_paci.parallel import liveness


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

# torch 2.13 prefers the *_single names and deprecates the *_tensor ones; a release
# without the new names gets the old.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)


class CommError(RuntimeError):
    """A collective failed: the message names this rank, the operation, the group's ranks
    and what the liveness heartbeats say about the peers (parallel/liveness.py)."""


def failure(what: str, group, kind: str, error: BaseException) -> CommError:
    """The error to raise when ``what`` over ``group`` failed with ``error``."""
    ranks = (dist.get_process_group_ranks(group) if group is not None
             else list(range(dist.get_world_size())))
    first = short_error(error)
    peers = liveness.explain(ranks)
    return CommError(f"rank {dist.get_rank()}: {what} over the {kind} group (ranks "
                     f"{', '.join(map(str, ranks))}) failed: {first}"
                     + (f"; {peers}" if peers else ""))


def short_error(error: BaseException) -> str:
    """The first line of a gloo/NCCL error without its source location and boilerplate."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first)
    return first.split(". This is typically caused", 1)[0]


_PEER_FAILURE = re.compile(r"Connection (reset|closed|refused)|Timed out|timed out|"
                           r"Broken pipe|NCCL|gloo", re.IGNORECASE)


def peer_failure(text: str) -> bool:
    """Whether an error's text reads like a peer that died or froze (diagnostics only:
    it decides whether the liveness report is worth waiting for)."""
    return bool(_PEER_FAILURE.search(text))


def wait(work, what: str, group, kind: str) -> None:
    """Wait for an asynchronous collective; a failure names the operation and peers."""
    if work is None:
        return
    try:
        work.wait()
    except Exception as e:  # gloo: a peer closed or the timeout passed
        raise failure(what, group, kind, e) from e


def _sync(what: str, group, kind: str, fn, /, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # gloo: a peer closed or the timeout passed
        raise failure(what, group, kind, e) from e


def barrier(group, kind: str) -> None:
    if group_size(group) > 1:
        _sync("barrier", group, kind, dist.barrier, group=group)


def all_reduce_max(t: torch.Tensor, group, kind: str) -> None:
    """In-place MAX all-reduce (flags every rank must agree on)."""
    if group_size(group) > 1:
        _sync("all_reduce (max)", group, kind, dist.all_reduce, t, op=dist.ReduceOp.MAX,
              group=group)


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
    if async_op:
        return dist.all_reduce(t, group=group, async_op=True)
    return _sync("all_reduce", group, kind, dist.all_reduce, t, group=group)


def all_gather(t: torch.Tensor, group, kind: str, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (equal shapes on all ranks)."""
    n = group_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    if dim == 0:
        STATS.add(kind, (n - 1) / n * _nbytes(out))
        _sync("all_gather", group, kind, _all_gather_single, out, t, group=group)
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
    return _all_gather_single(out, t, group=group, async_op=async_op)


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
    if async_op:
        return out, _reduce_scatter_single(out, t, group=group, async_op=True)
    _sync("reduce_scatter", group, kind, _reduce_scatter_single, out, t, group=group)
    return out


# When a list, every point-to-point call appends its ops, [("send" | "recv", peer)]:
# tests check the calls a run made against NCCL's blocking rules (pipeline/nccl_model.py).
P2P_CALLS: list[list[tuple[str, int]]] | None = None


def send(t: torch.Tensor, peer: int, group: Any, kind: str = "pp") -> Any:
    """Post a send of ``t`` to global rank ``peer`` on ``group``; returns the work. The
    caller keeps ``t`` alive until the work completes.

    NCCL blocks a communicator's stream on each send and receive until the peer's
    matching op runs, and keeps one communicator per pair of ranks per group. The
    pipeline therefore sends each direction between two stages on a group of its own
    (``ParallelState.p2p_group``): a stage's send to a neighbour never queues behind its
    receive from that neighbour, and ops are posted one at a time."""
    STATS.add(kind, _nbytes(t))
    if P2P_CALLS is not None:
        P2P_CALLS.append([("send", peer)])
    return dist.isend(t, peer, group=group)


def recv(buf: torch.Tensor, peer: int, group: Any, kind: str = "pp") -> Any:
    """Post a receive into ``buf`` from global rank ``peer`` on ``group``; returns the
    work (see ``send``)."""
    if P2P_CALLS is not None:
        P2P_CALLS.append([("recv", peer)])
    return dist.irecv(buf, peer, group=group)


def wait_recv(work: Any, peer: int) -> None:
    """Wait for the oldest receive not yet waited for from ``peer`` (posted by ``recv``):
    on NCCL the compute stream waits, on gloo the host. Recorded as ("wait", peer)."""
    if P2P_CALLS is not None:
        P2P_CALLS.append([("wait", peer)])
    work.wait()
