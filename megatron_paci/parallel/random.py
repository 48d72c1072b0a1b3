"""Seeding and RNG state capture, so a resumed run draws the same dropout masks.

States are captured as tensors only: every rank stores its own under its own
key in the checkpoint's tensor store, with nothing to pickle.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    state["numpy_extra"] = torch.tensor([pos, has_gauss, cached], dtype=torch.float64)
    version, py_state, gauss = random.getstate()
    state["python_state"] = torch.tensor(py_state, dtype=torch.int64)
    state["python_extra"] = torch.tensor(
        [version, math.nan if gauss is None else gauss], dtype=torch.float64)
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["torch_cuda"]))
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    version, gauss = state["python_extra"].tolist()
    py_state = tuple(int(x) for x in state["python_state"].tolist())
    random.setstate((int(version), py_state, None if math.isnan(gauss) else gauss))
