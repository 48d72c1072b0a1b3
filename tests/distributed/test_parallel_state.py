"""Process groups and comm accounting on 4 gloo ranks."""

import pytest
import torch
from launcher import spawn

from megatron_paci.parallel import comm
from megatron_paci.parallel.state import (
    ParallelConfigError,
    check_sizes,
    initialize,
    layout_table,
)


def _groups(rank, world):
    state = initialize(tensor=2, pipeline=2)
    out = {"coords": (state.tensor_rank, state.data_rank, state.pipeline_rank)}
    for name, group in (("tp", state.tensor_group), ("pp", state.pipeline_group)):
        ranks = comm.all_gather(torch.tensor([rank]), group, name)
        out[name] = ranks.tolist()
    x = torch.ones(8)
    comm.STATS.reset()
    comm.all_reduce(x, state.tensor_group, "tp")
    out["sum"] = x[0].item()
    out["bytes"] = comm.STATS.snapshot()
    return out


def test_megatron_rank_layout_tp_adjacent():
    res = spawn(_groups, 4)
    # rank = tp + 2 * (dp + 1 * pp): tensor ranks adjacent, pipeline outermost.
    assert [r["coords"] for r in res] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]
    assert [r["tp"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["sum"] == 2.0 for r in res)
    # ring all-reduce of 8 fp32 over 2 ranks: 2 * (1/2) * 32 bytes
    assert all(r["bytes"] == {"tp": 32} for r in res)


def test_layout_table_and_size_errors():
    rows = layout_table(8, tensor=2, pipeline=2)
    assert rows[5] == {"rank": 5, "tp": 1, "dp": 0, "pp": 1}
    assert check_sizes(8, 2, 2) == 2
    with pytest.raises(ParallelConfigError, match="world size 6 .* parallel.tensor=4"):
        check_sizes(6, 4, 1)
