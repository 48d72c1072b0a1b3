"""When the executor posts each receive: ahead of the action that needs it.

A receive posted only when its action starts costs a round trip on gloo: the sender's
data waits until the receiver asks for it, and on two busy cores each side's transport
thread wakes late (measured: PACI at P=2 spent a quarter of its time in receives; with
them posted ahead, 1.14-1.15x the iterations/s, docs/benchmarks.md). So before each action the
executor keeps the receives of the next ``RECEIVES_AHEAD`` receiving actions posted, in
list order: on each directed edge receives are still posted in the order the messages
are sent. On NCCL the host runs ahead of the device anyway; posting early only moves a
receive earlier on its own edge's stream (nccl_model.py replays it so).
"""

from __future__ import annotations

from collections.abc import Sequence

RECEIVES_AHEAD = 2  # the action's own receive and the next one


def receive_plan(peers: Sequence[int | None], ahead: int = RECEIVES_AHEAD) -> list[list[int]]:
    """For each position of a rank's list, the positions whose receives are posted just
    before it runs. ``peers[i]`` is the rank action ``i`` receives from (None: nothing):
    before action ``i`` the receives of the first ``ahead`` receiving actions from ``i``
    on are posted."""
    plan: list[list[int]] = []
    posted: set[int] = set()
    nxt = 0
    for pos in range(len(peers)):
        nxt = max(nxt, pos)
        now = []
        while nxt < len(peers) and len(posted) < ahead:
            if peers[nxt] is not None:
                posted.add(nxt)
                now.append(nxt)
            nxt += 1
        plan.append(now)
        posted.discard(pos)
    return plan
