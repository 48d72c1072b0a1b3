"""The NCCL call-order model the pipeline tests replay their point-to-point calls through,
checked on hand-written call lists: 1F1B on 2 stages with every op posted alone (the
classic deadlock), and with each send posted together with the next receive from the
same peer (Megatron's send_forward_recv_backward)."""

from megatron_paci.pipeline.nccl_model import stuck_calls

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


def test_ops_posted_alone_deadlock_in_1f1b():
    stuck = stuck_calls(ALONE)
    assert stuck is not None and stuck.startswith("deadlock")
    # Both stages sit on a send the other cannot receive yet.
    assert "rank 0 at call 1 [('send', 1)]" in stuck
    assert "rank 1 at call 1 [('send', 0)]" in stuck


def test_each_send_with_the_next_receive_from_its_peer_completes():
    assert stuck_calls(FUSED) is None


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
