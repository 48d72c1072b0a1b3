"""RNG capture keeps the current CUDA device's state only, so a checkpoint resumes when
the number of visible GPUs changes (torchrun shows all, slurm's --gpus-per-task one).

There is no GPU here: torch.cuda's RNG calls are replaced by a stand-in with one state
per device, and the checks are on which device's state is saved and restored.
"""

import random

import numpy as np
import torch

from megatron_paci.parallel import random as rng


class FakeCuda:
    def __init__(self, devices: int, current: int):
        self.states = [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(devices)]
        self.current = current

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", lambda: self.states[self.current].clone())
        monkeypatch.setattr(cuda, "set_rng_state", self._set)

    def _set(self, state) -> None:
        self.states[self.current] = state.clone()


def test_saves_and_restores_the_current_device_only(monkeypatch):
    fake = FakeCuda(devices=8, current=3)
    fake.install(monkeypatch)
    state = rng.capture_rng()
    assert state["torch_cuda"].tolist() == [103] * 16
    # Resumed under slurm binding: one visible GPU, device 0, gets this rank's state.
    bound = FakeCuda(devices=1, current=0)
    bound.install(monkeypatch)
    rng.restore_rng(state)
    assert bound.states[0].tolist() == [103] * 16


def test_restores_a_checkpoint_with_one_row_per_device(monkeypatch):
    random.seed(0)
    np.random.seed(0)
    old = rng.capture_rng()  # CPU, numpy and Python states as any checkpoint has them
    old["torch_cuda"] = torch.stack([torch.full((16,), i, dtype=torch.uint8)
                                     for i in range(8)])
    fake = FakeCuda(devices=8, current=5)
    fake.install(monkeypatch)
    rng.restore_rng(old)
    assert fake.states[5].tolist() == [5] * 16
    assert fake.states[4].tolist() == [104] * 16  # other devices untouched
    bound = FakeCuda(devices=1, current=0)
    bound.install(monkeypatch)
    rng.restore_rng(old)
    assert bound.states[0].tolist() == [0] * 16  # index past the visible ones: row 0
