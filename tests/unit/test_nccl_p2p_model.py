"""The NCCL call-order model the pipeline tests replay their point-to-point calls through,
checked on hand-written call lists: 1F1B on 2 stages with every op posted alone (the
classic deadlock on one stream per pair of ranks, which one stream per direction
removes), each send posted together with the next receive from the same peer
(Megatron's send_forward_recv_backward), and interleaved 1F1B, which that grouping
does not save."""

from megatron_paci.pipeline.nccl_model import executor_calls, stuck_calls
from megatron_paci.pipeline.registry import get_schedule

S0, S1 = 0, 1
# 1F1B, P=2, M=3. Stage 0: F1 F2 B1 F3 B2 B3. Stage 1: F1 B1 F2 B2 F3 B3.
ALONE = {
    S0: [[("send", S1)], [("send", S1)], [("recv", S1)], [("send", S1)], [("recv", S1)],
         [("recv", S1)]],
    S1: [[("recv", S0)], [("send", S0)], [("recv", S0)], [("send", S0)], [("recv", S0)],
         [("send", S0)]],
}
FUSED = {
    S0: [[("send", S1)], [("send", S1), ("recv", S1)], [("send", S1), ("recv", S1)],
         [("recv", S1)]],
    S1: [[("recv", S0)], [("send", S0), ("recv", S0)], [("send", S0), ("recv", S0)],
         [("send", S0)]],
}


def test_ops_posted_alone_deadlock_in_1f1b_on_one_stream_per_pair():
    stuck = stuck_calls(ALONE, per_direction=False)
    assert stuck is not None and stuck.startswith("deadlock")
    # Both stages sit on a send the other cannot receive yet.
    assert "rank 0 at call 1 [('send', 1)]" in stuck
    assert "rank 1 at call 1 [('send', 0)]" in stuck


def test_ops_posted_alone_complete_with_one_stream_per_direction():
    assert stuck_calls(ALONE) is None


def test_each_send_with_the_next_receive_from_its_peer_completes():
    assert stuck_calls(FUSED, per_direction=False) is None
    assert stuck_calls(FUSED) is None


def _fused(calls):
    """Megatron's grouping, written here apart from the executor: each send held and
    posted with the next receive when that comes from the same peer, else alone."""
    out = {}
    for rank, rank_calls in calls.items():
        merged, held = [], None
        for (kind, peer), in rank_calls:
            if kind == "send":
                if held is not None:
                    merged.append([held])
                held = (kind, peer)
            elif held is not None and held[1] == peer:
                merged.append([held, (kind, peer)])
                held = None
            else:
                if held is not None:
                    merged.append([held])
                    held = None
                merged.append([(kind, peer)])
        if held is not None:
            merged.append([held])
        out[rank] = merged
    return out


def test_interleaving_at_two_stages_needs_one_stream_per_direction():
    # P=2, v=2, M=4: rank 1's chunk 0 sends activations to rank 0's chunk 1 while rank 0
    # sends its chunk 0's to rank 1, so both directions between the pair carry
    # forwards at once. Megatron's grouping on one stream per pair deadlocks; the
    # executor's ops, one at a time on one stream per direction, complete.
    spec = get_schedule("1f1b_flush")
    lists = [spec.actions(2, s, 4, 2, 1, 2) for s in range(2)]
    calls = executor_calls(lists, 2)
    assert all(len(call) == 1 for rank_calls in calls.values() for call in rank_calls)
    assert stuck_calls(_fused(calls), per_direction=False).startswith("deadlock")
    assert stuck_calls(calls) is None


def test_a_send_nobody_receives_is_reported():
    calls = {S0: [[("send", S1)], [("send", S1)]], S1: [[("recv", S0)]]}
    assert "no matching op on rank 1" in stuck_calls(calls)


def test_a_receive_waits_for_the_compute_before_the_next_send():
    # Stage 1 must receive before it can send what it computed from that: a chain
    # 0 -> 1 -> 2 completes, the same ops with stage 1 sending first do not.
    chain = {0: [[("send", 1)]], 1: [[("recv", 0)], [("send", 2)]], 2: [[("recv", 1)]]}
    assert stuck_calls(chain) is None
    cycle = {0: [[("recv", 1)], [("send", 1)]], 1: [[("recv", 0)], [("send", 0)]]}
    assert stuck_calls(cycle).startswith("deadlock")
