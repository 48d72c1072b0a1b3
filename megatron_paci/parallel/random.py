"""Seeding and RNG state capture, so a resumed run draws the same dropout masks.

States are returned as tensors (for the checkpoint's tensor store) plus plain
numbers (for its JSON sidecar): nothing here needs pickle.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss = random.getstate()
    tensors["python_state"] = torch.tensor(py_state, dtype=torch.int64)
    scalars = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, gauss],
    }
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
    kind, pos, has_gauss, cached = scalars["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    version, gauss = scalars["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python_state"].tolist()), gauss))
