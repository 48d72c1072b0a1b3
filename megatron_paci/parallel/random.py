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
    """This process's RNG states. On CUDA only the current device's: a rank draws on its
    own GPU, and how many GPUs it sees can change between launches (torchrun shows all,
    slurm's --gpus-per-task=1 one), which a state per visible device would not survive."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
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
        cuda = state["torch_cuda"]
        if cuda.ndim == 2:  # written before 2026-11-29: one row per visible device
            index = torch.cuda.current_device()
            cuda = cuda[index if index < len(cuda) else 0]
        torch.cuda.set_rng_state(cuda)
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    version, gauss = state["python_extra"].tolist()
    py_state = tuple(int(x) for x in state["python_state"].tolist())
    random.setstate((int(version), py_state, None if math.isnan(gauss) else gauss))
