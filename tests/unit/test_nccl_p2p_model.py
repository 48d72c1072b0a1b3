"""The NCCL call-order model the pipeline tests replay their point-to-point calls through,
checked on hand-written call lists: 1F1B on 2 stages with every op posted alone (the
classic deadlock on one stream per pair of ranks, which one stream per direction
removes), each send posted together with the next receive from the same peer
(Megatron's send_forward_recv_backward), and interleaved 1F1B, which that grouping
does not save."""

from megatron_paci.pipeline.nccl_model import executor_calls, stuck_calls
from megatron_paci.pipeline.receives import receive_plan
from megatron_paci.pipeline.registry import get_schedule

S0, S1 = 0, 1


def calls(text):
    """'s1 r1 s1+r1': send to 1; receive from 1 (posted, then waited for); a send and a
    receive posted in one call, then the receive waited for. 'p1' posts a receive
    without waiting, 'w1' waits for the oldest one posted."""
    out = []
    for word in text.split():
        ops = [("send" if op[0] == "s" else "recv", int(op[1:])) for op in word.split("+")
               if op[0] in "sr"]
        if word[0] == "p":
            ops = [("recv", int(word[1:]))]
        if ops:
            out.append(ops)
        out += [[("wait", peer)] for kind, peer in ops if kind == "recv" and word[0] != "p"]
        if word[0] == "w":
            out.append([("wait", int(word[1:]))])
    return out


# 1F1B, P=2, M=3. Stage 0: F1 F2 B1 F3 B2 B3. Stage 1: F1 B1 F2 B2 F3 B3.
ALONE = {S0: calls("s1 s1 r1 s1 r1 r1"), S1: calls("r0 s0 r0 s0 r0 s0")}
FUSED = {S0: calls("s1 s1+r1 s1+r1 r1"), S1: calls("r0 s0+r0 s0+r0 s0")}


def test_ops_posted_alone_deadlock_in_1f1b_on_one_stream_per_pair():
    stuck = stuck_calls(ALONE, per_direction=False)
    assert stuck is not None and stuck.startswith("deadlock")
    # Both stages sit on a send the other cannot receive yet.
    assert "rank 0 at call 1 [('send', 1)]" in stuck
    assert "rank 1 at call 2 [('send', 0)]" in stuck


def test_ops_posted_alone_complete_with_one_stream_per_direction():
    assert stuck_calls(ALONE) is None


def test_each_send_with_the_next_receive_from_its_peer_completes():
    assert stuck_calls(FUSED, per_direction=False) is None
    assert stuck_calls(FUSED) is None


def _fused(rank_calls_by_rank):
    """Megatron's grouping, written here apart from the executor: each send held and
    posted with the next receive when that comes from the same peer, else alone; each
    receive waited for at once."""
    out = {}
    for rank, rank_calls in rank_calls_by_rank.items():
        merged, held = [], None
        ops = [op for (op,) in rank_calls if op[0] != "wait"]
        for kind, peer in ops:
            if kind == "send":
                if held is not None:
                    merged.append([held])
                held = (kind, peer)
                continue
            if held is not None and held[1] == peer:
                merged.append([held, (kind, peer)])
            else:
                if held is not None:
                    merged.append([held])
                merged.append([(kind, peer)])
            held = None
            merged.append([("wait", peer)])
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
    derived = executor_calls(lists, 2)
    assert all(len(call) == 1 for rank_calls in derived.values() for call in rank_calls)
    assert stuck_calls(_fused(derived), per_direction=False).startswith("deadlock")
    assert stuck_calls(derived) is None


def test_a_send_nobody_receives_is_reported():
    assert "no matching op on rank 1" in stuck_calls({S0: calls("s1 s1"), S1: calls("r0")})
    assert "which was not posted" in stuck_calls({S0: calls("s1"), S1: calls("r0 w0")})


def test_a_send_waits_for_the_compute_after_the_receives_before_it():
    # Stage 1 must receive before it can send what it computed from that: a chain
    # 0 -> 1 -> 2 completes; two stages that each wait for the other's message before
    # sending their own do not.
    chain = {0: calls("s1"), 1: calls("r0 s2"), 2: calls("r1")}
    assert stuck_calls(chain) is None
    assert stuck_calls({0: calls("r1 s1"), 1: calls("r0 s0")}).startswith("deadlock")


def test_a_receive_posted_ahead_does_not_hold_back_the_send_before_its_wait():
    # Each stage posts its receive first, sends, and only then waits: the receive is
    # in flight while the send goes, so nothing waits on anything not yet sent.
    assert stuck_calls({0: calls("p1 s1 w1"), 1: calls("p0 s0 w0")}) is None
    # The same with the waits before the sends is the cycle above.
    assert stuck_calls({0: calls("p1 w1 s1"), 1: calls("p0 w0 s0")}).startswith("deadlock")


def test_receive_plan_posts_the_next_two_receives_in_list_order():
    assert receive_plan([None, 1, None, 1, 1, None]) == [[1, 3], [], [4], [], [], []]
    assert receive_plan([1, 1, 1]) == [[0, 1], [2], []]
    assert receive_plan([1, 1, 1], ahead=1) == [[0], [1], [2]]
    assert receive_plan([None, None]) == [[], []]
