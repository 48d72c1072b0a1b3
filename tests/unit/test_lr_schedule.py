import math

import pytest

from megatron_paci.config.schema import OptimConfig
from megatron_paci.optim.lr_schedule import LRSchedule


def test_warmup_then_cosine_to_min():
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10), total_iters=110)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear"), total_iters=100)
    assert lin.lr_at(25) == pytest.approx(0.75)
    const = LRSchedule(OptimConfig(lr=0.5, min_lr=0.0, lr_decay_style="constant"), 100)
    assert const.lr_at(99) == 0.5


def test_state_round_trip():
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0), total_iters=100)
    for _ in range(37):
        s.step()
    t = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0), total_iters=100)
    t.load_state_dict(s.state_dict())
    assert t.lr == s.lr == s.lr_at(37)
