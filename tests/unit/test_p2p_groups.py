"""The pipeline's two point-to-point groups give every directed edge its own NCCL
communicator (parallel/state.py)."""


def test_each_directed_pipeline_edge_has_a_communicator_of_its_own():
    """NCCL keeps one communicator (one stream) per pair of ranks per group. Over the
    two p2p groups, every directed edge a pipeline sends on (next, previous, and last
    <-> first for virtual stages) must land on a (group, pair) no other edge uses,
    which is what nccl_model's one stream per (peer, direction) assumes."""
    from megatron_paci.parallel.state import ParallelState, neighbour_edges

    state = ParallelState(p2p_groups=("up", "down"))
    assert state.p2p_group(0, 1) == "up" and state.p2p_group(1, 0) == "down"
    assert ParallelState().p2p_group(0, 1) is None
    for ranks in ((0, 1), (0, 1, 2), (4, 5, 6, 7), (1, 9, 17, 25, 33)):
        n = len(ranks)
        used = {(ranks[i], ranks[(i + 1) % n]) for i in range(n)}
        used |= {(b, a) for a, b in used}
        edges = neighbour_edges(ranks)
        assert sorted(edges) == sorted(used) and len(edges) == len(set(edges))
        channels = {(state.p2p_group(a, b), frozenset((a, b))) for a, b in edges}
        assert len(channels) == len(edges)
