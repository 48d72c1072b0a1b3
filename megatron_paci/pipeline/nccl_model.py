"""Would a run's point-to-point calls complete under NCCL's rules? A sequential model.

gloo buffers sends, so a call order that deadlocks NCCL runs fine on a CPU. This
replays the calls each rank makes (a call is the list of ("send" | "recv", peer) ops
posted together, or a ("wait", peer) entry: what ``comm.P2P_CALLS`` records in a real run, or what
``executor_calls`` derives from the action lists before one) under NCCL's rules, taken
conservatively:

- a send or a receive blocks until the peer's matching op runs (no eager buffering);
- the ops of one call start together and each completes once its peer's op runs; the
  call is done when all are;
- a rank's calls on the same stream run in the order posted: a call starts once the
  earlier ones are done. NCCL has one stream per pair of ranks per group; the executor
  sends each direction on a group of its own (``ParallelState.p2p_group``), so a stream
  is a (peer, send or receive). ``per_direction=False`` models both directions on one
  group (one stream per peer);
- a ("wait", peer) entry is where the rank's compute first needs its oldest receive
  from that peer not yet waited for: it is done once that receive is. A call waits
  for every earlier wait of its rank: what it sends was computed after those
  receives, on an in-order compute stream (and NCCL starts a receive too only after
  the compute queued before it, to protect its buffer).

The k-th send from rank a to rank b matches the k-th receive at b from a.

What it found (tests/unit/test_nccl_p2p_model.py): on one stream per peer, 1F1B
deadlocks with each op posted alone, and interleaved 1F1B deadlocks even with each
send posted together with the next receive from its peer (Megatron's
send_forward_recv_backward); on one stream per direction every registered schedule
completes with each op posted alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_paci.pipeline.actions import Action
from megatron_paci.pipeline.receives import receive_plan

Call = list[tuple[str, int]]


def executor_calls(lists: Sequence[Sequence[Action]], chunks: int) -> dict[int, list[Call]]:
    """The point-to-point calls the executor makes for these per-rank lists (ranks
    0..P-1), by its rule: receives are posted ahead by ``receive_plan``, each alone;
    an action waits for its receive, runs, and posts its send alone. The distributed
    tests check this against the calls real runs record."""
    stages = len(lists)
    last = stages * chunks - 1
    out: dict[int, list[Call]] = {}
    for rank, actions in enumerate(lists):
        peers: list[int | None] = []  # the rank each action receives from, sends to
        dsts: list[int | None] = []
        for a in actions:
            u = a.chunk * stages + rank
            v = {"prev": u - 1, "next": u + 1}.get(a.spec.receives_from)
            peers.append(v % stages if v is not None and 0 <= v <= last else None)
            w = {"F": u + 1, "B": u - 1}.get(a.kind)
            dsts.append(w % stages if w is not None and 0 <= w <= last else None)
        calls: list[Call] = []
        for peer, dst, posts in zip(peers, dsts, receive_plan(peers), strict=True):
            calls += [[("recv", peers[i])] for i in posts]
            if peer is not None:
                calls.append([("wait", peer)])
            if dst is not None:
                calls.append([("send", dst)])
        out[rank] = calls
    return out


def stuck_calls(calls: dict[int, list[Call]], per_direction: bool = True) -> str | None:
    """None if every call completes; else what each rank is stuck on.

    Event-driven and linear in the calls: a call depends only on the previous call of
    its rank on each of its streams and on its rank's previous wait; a wait on its
    receive and the previous wait (those started only once everything earlier they
    depend on was done)."""
    side: dict[tuple[tuple[int, int, int], str], tuple[int, int]] = {}  # (msg, kind) -> call
    ops: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    deps: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for rank, rank_calls in calls.items():
        sent: dict[int, int] = {}
        got: dict[int, int] = {}
        last_with: dict[tuple[int, str], int] = {}
        last_wait: int | None = None
        recv_calls: dict[int, list[int]] = {}  # peer -> the calls posting its receives
        waited: dict[int, int] = {}
        for i, call in enumerate(rank_calls):
            if call and call[0][0] == "wait":  # compute needs the next receive from peer
                peer = call[0][1]
                k = waited.get(peer, 0)
                waited[peer] = k + 1
                if k >= len(recv_calls.get(peer, [])):
                    return (f"rank {rank} call {i}: waits for receive {k} from rank {peer}, "
                            "which was not posted")
                ops[(rank, i)] = []
                deps[(rank, i)] = {(rank, recv_calls[peer][k])} | (
                    {(rank, last_wait)} if last_wait is not None else set())
                last_wait = i
                continue
            ids = []
            for kind, peer in call:
                count = sent if kind == "send" else got
                k = count.get(peer, 0)
                count[peer] = k + 1
                msg = (rank, peer, k) if kind == "send" else (peer, rank, k)
                ids.append(msg)
                side[(msg, kind)] = (rank, i)
                if kind == "recv":
                    recv_calls.setdefault(peer, []).append(i)
            ops[(rank, i)] = ids
            streams = [(p, kind if per_direction else "") for kind, p in call]
            need = {(rank, last_with[st]) for st in streams if st in last_with}
            if last_wait is not None:
                need.add((rank, last_wait))
            deps[(rank, i)] = need
            for st in streams:
                last_with[st] = i
    for (msg, kind), (rank, i) in sorted(side.items(), key=lambda kv: kv[1]):
        if (msg, "recv" if kind == "send" else "send") not in side:
            src, dst, _ = msg
            other = dst if rank == src else src
            return f"rank {rank} call {i}: message {msg} has no matching op on rank {other}"

    def partner(msg: tuple[int, int, int], rank: int) -> tuple[int, int]:
        kind = "recv" if msg[0] == rank else "send"
        return side[(msg, kind)]

    dependents: dict[tuple[int, int], list[tuple[int, int]]] = {c: [] for c in ops}
    for c, need in deps.items():
        for d in need:
            dependents[d].append(c)
    waiting = {c: len(need) for c, need in deps.items()}
    left = {c: len(ids) for c, ids in ops.items()}
    started: set[tuple[int, int]] = set()
    done: set[tuple[int, int]] = set()
    todo = [c for c, n in waiting.items() if n == 0]
    while todo:
        call = todo.pop()
        started.add(call)
        finished = [call] if not ops[call] else []
        for msg in ops[call]:
            other = partner(msg, call[0])
            if other in started:  # both ends posted: the op completes on both sides
                for c in (call, other):
                    left[c] -= 1
                    if left[c] == 0:
                        finished.append(c)
        for c in finished:
            done.add(c)
            for nxt in dependents[c]:
                waiting[nxt] -= 1
                if waiting[nxt] == 0:
                    todo.append(nxt)
    if len(done) == len(ops):
        return None
    heads = []
    for rank, rank_calls in sorted(calls.items()):
        stuck = [i for i in range(len(rank_calls)) if (rank, i) not in done]
        if stuck:
            heads.append(f"rank {rank} at call {stuck[0]} {rank_calls[stuck[0]]}")
    return "deadlock: " + "; ".join(heads)
