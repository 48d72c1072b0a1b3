"""ZeRO-1 slices as blocks of the global tensor: the block cut, and DCP writing and
reading such blocks (one process) against plain whole tensors."""

import math

import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_paci.checkpoint.flat_shards import FlatShard, row_major_boxes
from megatron_paci.checkpoint.format import _SavePlanner, _TensorOnlyLoadPlanner
from megatron_paci.optim.distributed_optimizer import FlatSlice


def _elements(shape, boxes):
    """The flat indices a list of boxes covers, in the boxes' order."""
    index = torch.arange(math.prod(shape)).view(shape) if shape else torch.tensor(0)
    out = []
    for offsets, sizes in boxes:
        block = index
        for d, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
            block = block.narrow(d, o, n)
        out += block.reshape(-1).tolist()
    return out


def test_boxes_by_hand():
    # 3 x 4: elements 2..9 are the end of row 0, all of row 1, the start of row 2.
    assert row_major_boxes((3, 4), 2, 8) == [((0, 2), (1, 2)), ((1, 0), (1, 4)),
                                             ((2, 0), (1, 2))]
    assert row_major_boxes((3, 4), 4, 8) == [((1, 0), (2, 4))]
    assert row_major_boxes((5,), 1, 3) == [((1,), (3,))]
    assert row_major_boxes((2, 2, 3), 4, 6) == [((0, 1, 1), (1, 1, 2)), ((1, 0, 0), (1, 1, 3)),
                                                ((1, 1, 0), (1, 1, 1))]
    assert row_major_boxes((3, 4), 5, 0) == []


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(shapes, st.data())
def test_boxes_cover_the_run_in_order(shape, data):
    n = math.prod(shape)
    start = data.draw(st.integers(0, n))
    length = data.draw(st.integers(0, n - start))
    boxes = row_major_boxes(shape, start, length)
    assert _elements(shape, boxes) == list(range(start, start + length))
    assert len(boxes) <= 2 * len(shape) - 1  # a partial row, whole rows, a partial row per dim


def _split(shape, cuts, tp_dim, tp_size, values):
    """FlatShards for every (tp rank, ZeRO piece) of a global tensor ``values``; the
    local shard of each tp rank is cut into runs at ``cuts``."""
    out = []
    for r in range(tp_size):
        local = values.chunk(tp_size, tp_dim)[r].contiguous() if tp_dim is not None else values
        flat = local.reshape(-1)
        edges = [0, *sorted(c % (flat.numel() + 1) for c in cuts), flat.numel()]
        slices = [FlatSlice(local.shape, a, flat[a:b])
                  for a, b in zip(edges, edges[1:], strict=False) if a < b]
        out.append((FlatShard.of(slices, tp_dim, r, tp_size), flat))
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=3),
       st.lists(st.integers(0, 200), max_size=4), st.sampled_from([None, 0, -1]),
       st.sampled_from([1, 2]))
def test_dcp_writes_and_reads_the_blocks(tmp_path_factory, shape, cuts, tp_dim, tp_size):
    if tp_dim is not None:
        tp_dim %= len(shape)
        shape = list(shape)
        shape[tp_dim] *= tp_size
    else:
        tp_size = 1
    full = torch.randn(shape)
    shards = _split(shape, cuts, tp_dim, tp_size, full)
    # One process writes every rank's blocks (as if all ranks wrote at once) ...
    merged = FlatShard([p for s, _ in shards for p in s.pieces], full.shape)
    path = str(tmp_path_factory.mktemp("blocks"))
    dcp.save({"m": merged}, checkpoint_id=path, planner=_SavePlanner(), no_dist=True)
    # ... and the whole tensor reads back exactly.
    back = {"m": torch.zeros(shape)}
    dcp.load(back, checkpoint_id=path, planner=_TensorOnlyLoadPlanner(), no_dist=True)
    assert torch.equal(back["m"], full)
    # A whole tensor written plainly reads into fresh blocks in place.
    plain = str(tmp_path_factory.mktemp("plain"))
    dcp.save({"m": full}, checkpoint_id=plain, no_dist=True)
    targets = _split(shape, cuts, tp_dim, tp_size, torch.zeros(shape))
    for shard, _ in targets:
        dcp.load({"m": shard}, checkpoint_id=plain, planner=_TensorOnlyLoadPlanner(),
                 no_dist=True)
    for r, (_, flat) in enumerate(targets):
        local = full.chunk(tp_size, tp_dim)[r] if tp_dim is not None else full
        assert torch.equal(flat, local.reshape(-1))


def test_staging_copies_the_blocks_only():
    import copy

    buf = torch.arange(100.0)
    shard = FlatShard.of([FlatSlice(torch.Size([4, 5]), 3, buf[10:22])], None, 0, 1)
    staged = copy.deepcopy(shard)
    buf.zero_()
    assert sum(v.numel() for _, v in staged.pieces) == 12
    assert all(v.untyped_storage().nbytes() == v.numel() * 4 for _, v in staged.pieces)
    assert torch.cat([v.reshape(-1) for _, v in staged.pieces]).tolist() == \
        [float(x) for x in range(10, 22)]
