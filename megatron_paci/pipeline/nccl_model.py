"""Would a run's point-to-point calls complete under NCCL's rules? A sequential model.

gloo buffers sends, so a call order that deadlocks NCCL runs fine on a CPU. This
replays the calls each rank makes (a call is the list of ("send" | "recv", peer) ops
posted together: what ``comm.P2P_CALLS`` records in a real run, or what
``executor_calls`` derives from the action lists before one) under NCCL's rules, taken
conservatively:

- a send or a receive blocks until the peer's matching op runs (no eager buffering);
- the ops of one call (one ``batch_isend_irecv``) start together and each completes
  once its peer's op runs; the call is done when all are;
- a rank's calls touching the same peer run in the order posted (one stream per pair):
  a call starts once the earlier ones are done;
- a call waits for every earlier call of its rank that received something: what it
  sends was computed after those receives, on an in-order compute stream.

The k-th send from rank a to rank b matches the k-th receive at b from a.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_paci.pipeline.actions import Action

Call = list[tuple[str, int]]


def executor_calls(lists: Sequence[Sequence[Action]], chunks: int) -> dict[int, list[Call]]:
    """The point-to-point calls the executor makes for these per-rank lists (ranks
    0..P-1), by its rule: a send is held until the next action, posted with that
    action's receive when it comes from the same peer, else alone before it; a STEP
    and the end of the list post it alone. The distributed tests check this
    against the calls real runs record."""
    stages = len(lists)
    last = stages * chunks - 1
    out: dict[int, list[Call]] = {}
    for rank, actions in enumerate(lists):
        calls: list[Call] = []
        held: int | None = None
        for a in actions:
            u = a.chunk * stages + rank
            side = a.spec.receives_from
            src = None
            if side is not None:
                v = u - 1 if side == "prev" else u + 1
                src = v % stages if 0 <= v <= last else None
            if held is not None and src != held:
                calls.append([("send", held)])
                held = None
            if src is not None:
                calls.append(([("send", held)] if held is not None else []) + [("recv", src)])
                held = None
            dst = {"F": u + 1, "B": u - 1}.get(a.kind)
            if dst is not None and 0 <= dst <= last:
                held = dst % stages
        if held is not None:
            calls.append([("send", held)])
        out[rank] = calls
    return out


def stuck_calls(calls: dict[int, list[Call]]) -> str | None:
    """None if every call completes; else what each rank is stuck on."""
    owner: dict[tuple[int, int, int], tuple[int, int]] = {}  # (src, dst, k) -> (rank, call)
    ops: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for rank, rank_calls in calls.items():
        sent: dict[int, int] = {}
        got: dict[int, int] = {}
        for i, call in enumerate(rank_calls):
            ids = []
            for kind, peer in call:
                count = sent if kind == "send" else got
                k = count.get(peer, 0)
                count[peer] = k + 1
                ids.append((rank, peer, k) if kind == "send" else (peer, rank, k))
            ops[(rank, i)] = ids
            for msg in ids:
                owner.setdefault(msg, (rank, i))
    for msg, (rank, i) in owner.items():
        src, dst, _ = msg
        other = dst if rank == src else src
        if not any(m == msg for j in range(len(calls.get(other, [])))
                   for m in ops[(other, j)]):
            return f"rank {rank} call {i}: message {msg} has no matching op on rank {other}"

    def partner(msg: tuple[int, int, int], rank: int) -> tuple[int, int]:
        src, dst, _ = msg
        other = dst if rank == src else src
        return next((other, j) for j in range(len(calls[other])) if msg in ops[(other, j)])

    started: set[tuple[int, int]] = set()
    finished_ops: set[tuple[int, int, int]] = set()
    done: set[tuple[int, int]] = set()
    total = sum(len(c) for c in calls.values())
    while len(done) < total:
        progress = False
        for rank, rank_calls in calls.items():
            for i, call in enumerate(rank_calls):
                if (rank, i) in started:
                    continue
                peers = {p for _, p in call}
                if all((rank, j) in done for j, c in enumerate(rank_calls[:i])
                       if peers & {p for _, p in c} or any(k == "recv" for k, _ in c)):
                    started.add((rank, i))
                    progress = True
        # An op completes once the call holding its counterpart runs too; a call is
        # done when all its ops are.
        for rank, i in started - done:
            for msg in ops[(rank, i)]:
                if msg not in finished_ops and partner(msg, rank) in started:
                    finished_ops.add(msg)
                    progress = True
            if all(msg in finished_ops for msg in ops[(rank, i)]):
                done.add((rank, i))
                progress = True
        if not progress:
            heads = []
            for rank, rank_calls in sorted(calls.items()):
                left = [i for i in range(len(rank_calls)) if (rank, i) not in done]
                if left:
                    heads.append(f"rank {rank} at call {left[0]} {rank_calls[left[0]]}")
            return "deadlock: " + "; ".join(heads)
    return None
