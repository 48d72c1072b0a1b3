"""Blend several datasets into one by weight, deterministically and evenly interleaved.

Sample i goes to the dataset lagging furthest behind its target share, so every prefix
of the blend matches the weights to within one sample per dataset; no randomness is
needed, and the same weights always give the same order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def normalize_weights(weights: list[float]) -> list[float]:
    """Weights scaled to sum to 1; they must be finite, >= 0 and not all 0."""
    values = [float(w) for w in weights]
    if not values:
        raise ValueError("no weights given")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights must not all be 0, got {list(weights)}")
    return [w / total for w in values]


def build_blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each blended sample: which dataset it comes from and that dataset's sample.

    Greedy: sample i goes to the dataset with the largest w_d * (i + 1) - count_d
    (ties to the lowest index).
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    w = normalize_weights(weights)
    n = len(w)
    if n > np.iinfo(np.int16).max:
        raise ValueError(f"at most {np.iinfo(np.int16).max} datasets can be blended, got {n}")
    counts = [0] * n
    chosen = [0] * size
    within = [0] * size
    for i in range(size):
        target = i + 1
        best, best_err = 0, w[0] * target - counts[0]
        for d in range(1, n):
            err = w[d] * target - counts[d]
            if err > best_err:
                best, best_err = d, err
        chosen[i] = best
        within[i] = counts[best]
        counts[best] += 1
    return np.array(chosen, dtype=np.int16), np.array(within, dtype=np.int64)


def _describe(ds: Any) -> str:
    """A child's prefix and split when it has them (a GPTDataset does), else its type."""
    parts = [str(getattr(ds, a)) for a in ("prefix", "name") if hasattr(ds, a)]
    return " ".join(parts) or type(ds).__name__


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights`."""

    def __init__(self, datasets: list, weights: list[float], size: int) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            self.weights, self.size
        )
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, need) in enumerate(zip(self.datasets, needed, strict=True)):
            if ds is None:
                raise ValueError(f"dataset {d} of the blend is missing (None)")
            if need > len(ds):
                raise ValueError(
                    f"dataset {d} ({_describe(ds)}) has {len(ds)} samples but its weight "
                    f"{self.weights[d]:.4g} of {self.size} needs {need}"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Any:
        idx = int(idx)
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]
