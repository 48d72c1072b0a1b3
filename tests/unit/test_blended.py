"""Blending order against hand-worked cases and a naive reference."""

import math

import numpy as np
import pytest

from megatron_paci.data.blended import BlendedDataset, build_blending_indices, normalize_weights


def naive_blend(weights, size):
    """The greedy rule spelled out: most-behind dataset first, ties to the lowest index."""
    total = sum(weights)
    w = [x / total for x in weights]
    counts = [0] * len(w)
    ds, within = [], []
    for i in range(size):
        errors = [w[d] * (i + 1) - counts[d] for d in range(len(w))]
        d = errors.index(max(errors))
        ds.append(d)
        within.append(counts[d])
        counts[d] += 1
    return ds, within


def test_normalize_weights():
    assert normalize_weights([1, 3]) == [0.25, 0.75]
    assert normalize_weights([2.0]) == [1.0]
    for bad in ([], [0, 0], [-1, 2], [float("nan"), 1]):
        with pytest.raises(ValueError):
            normalize_weights(bad)


def test_hand_worked_cases():
    ds, within = build_blending_indices([0.5, 0.5], 4)
    assert ds.tolist() == [0, 1, 0, 1]
    assert within.tolist() == [0, 0, 1, 1]
    # errors: i0 (.75,.25)->0; i1 (.5,.5) tie->0; i2 (.25,.75)->1; i3 (1,0)->0
    ds, within = build_blending_indices([3, 1], 4)
    assert ds.tolist() == [0, 0, 1, 0]
    assert within.tolist() == [0, 1, 0, 2]
    assert within.dtype == np.int64


@pytest.mark.parametrize(
    "weights", [[0.7, 0.3], [0.2, 0.5, 0.3], [1, 1, 1, 1, 1], [0.01, 0.99], [5, 0, 2]]
)
def test_matches_naive_reference_and_weights(weights):
    size = 997
    ds, within = build_blending_indices(weights, size)
    ref_ds, ref_within = naive_blend(weights, size)
    assert ds.tolist() == ref_ds
    assert within.tolist() == ref_within
    w = np.array(weights, dtype=float) / sum(weights)
    for n in (1, 10, 123, size):
        counts = np.bincount(ds[:n], minlength=len(weights))
        assert np.all(np.abs(counts - w * n) <= 1), (n, counts, w * n)
    # each dataset's samples are taken in order 0, 1, 2, ...
    for d in range(len(weights)):
        assert within[ds == d].tolist() == list(range(int((ds == d).sum())))


class Named:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"src": self.name, "i": i}


def test_blended_dataset_draws_from_children():
    a, b = Named("a", 100), Named("b", 100)
    blend = BlendedDataset([a, b], [0.75, 0.25], 40)
    assert len(blend) == 40
    ref_ds, ref_within = naive_blend([0.75, 0.25], 40)
    got = [blend[i] for i in range(40)]
    assert got == [{"src": "ab"[d], "i": j} for d, j in zip(ref_ds, ref_within, strict=True)]
    assert sum(g["src"] == "a" for g in got) == 30
    with pytest.raises(IndexError):
        blend[40]


def test_blended_dataset_rejects_small_child():
    with pytest.raises(ValueError, match="dataset 1"):
        BlendedDataset([Named("a", 100), Named("b", 5)], [0.5, 0.5], 20)
    # exactly enough is fine: b needs ceil(0.5 * 20) = 10
    BlendedDataset([Named("a", 10), Named("b", 10)], [0.5, 0.5], 20)
    with pytest.raises(ValueError):
        BlendedDataset([Named("a", 10)], [0.5, 0.5], 5)


def test_large_blend_is_fast_enough():
    ds, _ = build_blending_indices([0.3, 0.7], 200_000)
    assert abs(int((ds == 0).sum()) - 60_000) <= 1
    assert math.isclose(float((ds == 1).mean()), 0.7, abs_tol=1e-5)
