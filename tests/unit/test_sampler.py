"""Data-parallel sampler: disjoint cover of each global block, exact resume."""

import numpy as np
import pytest
import torch

from megatron_paci.data.sampler import PretrainingSampler, build_pretraining_data_loader


def batches(total, consumed, mbs, rank, size, drop_last=True):
    return list(PretrainingSampler(total, consumed, mbs, rank, size, drop_last))


def test_single_rank_is_sequential():
    assert batches(10, 0, 3, 0, 1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert batches(10, 0, 3, 0, 1, drop_last=False)[-1] == [9]


def test_ranks_split_each_global_block():
    total, mbs, size = 50, 3, 2
    per_rank = [batches(total, 0, mbs, r, size) for r in range(size)]
    assert per_rank[0][:2] == [[0, 1, 2], [6, 7, 8]]
    assert per_rank[1][:2] == [[3, 4, 5], [9, 10, 11]]
    assert len(per_rank[0]) == len(per_rank[1]) == 50 // 6
    for step, (b0, b1) in enumerate(zip(*per_rank, strict=True)):
        block = set(range(step * 6, step * 6 + 6))
        assert set(b0) | set(b1) == block
        assert not set(b0) & set(b1)
        assert len(b0) == len(b1) == mbs


def test_resume_yields_the_tail():
    total, mbs, size = 100, 2, 4
    full = [batches(total, 0, mbs, r, size) for r in range(size)]
    for steps_done in (0, 1, 5, 12):
        consumed = steps_done * mbs * size
        for r in range(size):
            resumed = batches(total, consumed, mbs, r, size)
            assert resumed == full[r][steps_done:]


def test_resume_in_samples_not_steps():
    # consumed counts samples, so a resume with a different DP size stays aligned
    seq = [i for b in batches(40, 0, 4, 0, 1) for i in b]
    two = [batches(40, 8, 2, r, 2) for r in range(2)]
    merged = [i for step in zip(*two, strict=True) for b in step for i in b]
    assert merged == seq[8:]


def test_len_counts_batches():
    for total, consumed, mbs, size, drop in [(50, 0, 3, 2, True), (50, 6, 3, 2, False)]:
        for r in range(size):
            s = PretrainingSampler(total, consumed, mbs, r, size, drop)
            assert len(s) == len(list(s))
    # last partial block (2 samples) reaches rank 0 only
    assert batches(14, 0, 2, 0, 3, drop_last=False)[-1] == [12, 13]
    assert batches(14, 0, 2, 1, 3, drop_last=False)[-1] == [8, 9]


@pytest.mark.parametrize(
    "args, text",
    [
        ((0, 0, 1, 0, 1), "total_samples"),
        ((10, 10, 1, 0, 1), "consumed_samples"),
        ((10, -1, 1, 0, 1), "consumed_samples"),
        ((10, 0, 0, 0, 1), "micro_batch_size"),
        ((10, 0, 1, 0, 0), "data_parallel_size"),
        ((10, 0, 1, 2, 2), "data_parallel_rank"),
    ],
)
def test_validation_names_the_value(args, text):
    with pytest.raises(ValueError, match=text):
        PretrainingSampler(*args)


class Indexed(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"tokens": np.full(3, i, dtype=np.int64)}


def test_data_loader():
    assert build_pretraining_data_loader(None, 0, 2, 0, 1) is None
    loader = build_pretraining_data_loader(Indexed(), 4, 2, 1, 2)
    got = [b["tokens"] for b in loader]
    assert len(got) == len(loader) == 4
    assert got[0].dtype == torch.int64
    assert got[0].tolist() == [[6] * 3, [7] * 3]
    assert got[1][:, 0].tolist() == [10, 11]
