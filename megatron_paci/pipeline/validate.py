"""Offline checks of per-rank action lists, before any process group starts.

A list the executor cannot run must be refused naming the first bad action, not found
as a hang on a cluster. Checked here: every forward is backwarded once, after it; each
STEP(k) accumulates exactly window k's backwards; a globally stepping schedule keeps
F(j) and B(j) on one version; the lists complete when played against each other (no
deadlock); and between every pair of ranks the messages are received in the order
they are sent, which is how NCCL (and this executor, which sends no tags) matches them.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_paci.pipeline.actions import Action
from megatron_paci.pipeline.registry import ScheduleSpec


class ScheduleListError(ValueError):
    """A per-rank action list that cannot run; the message names rank and action."""


def _window_of(j: int, window: int) -> int:
    return (j - 1) // window + 1


def check_rank(spec: ScheduleSpec, rank: int, actions: Sequence[Action], window: int,
               num_windows: int, first_window: int, chunks: int) -> None:
    """One rank's list on its own: coverage, order of F/B, and where STEPs sit."""
    first_j = (first_window - 1) * window + 1
    js = range(first_j, first_j + window * num_windows)
    forwarded: set[tuple[int, int]] = set()
    backwarded: set[tuple[int, int]] = set()
    # A local-step schedule's STEP(k, c) closes window k of chunk c alone; a global one
    # closes it for every chunk of the rank (scope 0).
    per_chunk = spec.steps_per_chunk
    scopes = range(chunks) if per_chunk else range(1)
    steps = {c: first_window for c in scopes}  # the next STEP expected, per scope
    v = {c: first_window - 1 for c in scopes}
    v_f: dict[tuple[int, int], int] = {}
    where = f"rank {rank}"

    def scope(chunk: int) -> int:
        return chunk if per_chunk else 0

    def name(kind: str, index: int, chunk: int) -> str:
        return f"{kind}{index}{f'c{chunk}' if chunk else ''}"

    for pos, a in enumerate(actions):
        at = f"{where}, action {pos} ({a})"
        if a.chunk >= chunks:
            raise ScheduleListError(f"{at}: chunk {a.chunk} but the rank holds {chunks}")
        if a.kind == "STEP":
            if a.chunk and not per_chunk:
                raise ScheduleListError(f"{at}: a global STEP updates every chunk of the "
                                        f"rank and names none ({spec.title} steps globally)")
            c = a.chunk
            if a.index != steps[c]:
                raise ScheduleListError(f"{at}: expected {name('STEP', steps[c], c)} next")
            closes = [c] if per_chunk else range(chunks)
            pending = [(cc, j) for cc in closes
                       for j in range((a.index - 1) * window + 1, a.index * window + 1)
                       if (cc, j) not in backwarded]
            if pending:
                cc, j = pending[0]
                raise ScheduleListError(
                    f"{at}: steps before {name('B', j, cc)} of its window "
                    f"(a STEP inside window {a.index})")
            steps[c] += 1
            v[c] += 1
            continue
        key = (a.chunk, a.index)
        if a.index not in js:
            raise ScheduleListError(f"{at}: micro-batch {a.index} is outside "
                                    f"{js.start}..{js.stop - 1}")
        if a.kind == "F":
            if key in forwarded:
                raise ScheduleListError(f"{at}: forwarded twice")
            forwarded.add(key)
            v_f[key] = v[scope(a.chunk)]
        elif a.kind == "B":
            if key not in forwarded:
                raise ScheduleListError(f"{at}: backward before its forward")
            if key in backwarded:
                raise ScheduleListError(f"{at}: backwarded twice")
            open_window = steps[scope(a.chunk)]
            if _window_of(a.index, window) != open_window:
                raise ScheduleListError(
                    f"{at}: backward of window {_window_of(a.index, window)} while window "
                    f"{open_window} has not stepped (a window cut in half)")
            backwarded.add(key)
            if spec.global_step and v_f[key] != v[0]:
                raise ScheduleListError(
                    f"{at}: a STEP falls between its forward and backward, which a "
                    f"globally stepping schedule ({spec.title}) does not allow")
    missing = [(c, j) for j in js for c in range(chunks) if (c, j) not in forwarded]
    if missing:
        c, j = missing[0]
        raise ScheduleListError(f"{where}: {name('F', j, c)} never runs")
    never = sorted(forwarded - backwarded, key=lambda k: (k[1], k[0]))
    if never:
        c, j = never[0]
        raise ScheduleListError(f"{where}: {name('F', j, c)} is never backwarded")
    for c in scopes:
        if steps[c] != first_window + num_windows:
            label = f" of chunk {c}" if per_chunk and chunks > 1 else ""
            raise ScheduleListError(
                f"{where}: ends after STEP{steps[c] - 1}{label}, expected "
                f"STEP{first_window + num_windows - 1}")


def messages(lists: Sequence[Sequence[Action]], chunks: int
             ) -> tuple[dict[tuple[int, int], list], dict[tuple[int, int], list]]:
    """Per (src rank, dst rank): the messages in send order and in receive order."""
    stages = len(lists)
    last = stages * chunks - 1
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for rank, actions in enumerate(lists):
        for a in actions:
            u = a.chunk * stages + rank
            src = {"prev": u - 1, "next": u + 1}.get(a.spec.receives_from)
            if src is not None and 0 <= src <= last:
                received.setdefault((src % stages, rank), []).append((a.kind, src, u, a.index))
            # What this action sends on: a forward's output onwards, a backward's input
            # gradient back; the receiver consumes it under the matching kind.
            dst = {"F": u + 1, "B": u - 1}.get(a.kind)
            if dst is not None and 0 <= dst <= last:
                sent.setdefault((rank, dst % stages), []).append((a.kind, u, dst, a.index))
    return sent, received


def check_lists(spec: ScheduleSpec, lists: Sequence[Sequence[Action]], window: int,
                num_windows: int, first_window: int = 1, chunks: int = 1,
                nccl: bool = False) -> None:
    """Raise ScheduleListError naming the first problem in a whole set of rank lists.

    With ``nccl`` the point-to-point calls the executor would make are replayed under
    NCCL's blocking rules (nccl_model.py); gloo buffers sends and needs no such check."""
    from megatron_paci.pipeline.simulate import Costs, run_lists

    for rank, actions in enumerate(lists):
        check_rank(spec, rank, actions, window, num_windows, first_window, chunks)
    if len(lists) > 1:
        try:
            run_lists(spec, lists, chunks, [Costs()] * len(lists))
        except RuntimeError as e:
            raise ScheduleListError(str(e)) from None
    sent, received = messages(lists, chunks)
    for pair in sorted(set(sent) | set(received)):
        out, got = sent.get(pair, []), received.get(pair, [])
        for i, (a, b) in enumerate(zip(out, got, strict=False)):
            if a != b:
                raise ScheduleListError(
                    f"rank {pair[0]} -> rank {pair[1]}: message {i} is sent for "
                    f"{_what(a)} but received as {_what(b)}: without tags (NCCL) they "
                    "would be swapped")
        if len(out) != len(got):
            raise ScheduleListError(f"rank {pair[0]} -> rank {pair[1]}: {len(out)} messages "
                                    f"sent, {len(got)} received")
    if nccl and len(lists) > 1:
        check_nccl(lists, chunks)


def _what(msg: tuple) -> str:
    kind, src, dst, j = msg
    noun = "activations" if kind == "F" else "gradients"
    return f"{noun} of micro-batch {j} (virtual stage {src} -> {dst})"


def check_schedule(spec: ScheduleSpec, stages: int, window: int, chunks: int = 1,
                   num_windows: int = 2, nccl: bool = False) -> None:
    """Build ``num_windows`` windows of every rank's list and check them together."""
    lists = [spec.actions(stages, s, window, num_windows, 1, chunks) for s in range(stages)]
    check_lists(spec, lists, window, num_windows, 1, chunks)
    if nccl and stages > 1:
        check_nccl(lists, chunks)


def check_nccl(lists: Sequence[Sequence[Action]], chunks: int) -> None:
    """Refuse lists whose executor calls NCCL's blocking rules would hang."""
    from megatron_paci.pipeline.nccl_model import executor_calls, stuck_calls

    stuck = stuck_calls(executor_calls(lists, chunks))
    if stuck:
        raise ScheduleListError(
            f"the executor's point-to-point calls for these lists would deadlock on "
            f"NCCL ({stuck}); gloo (train.device=cpu) runs them")
