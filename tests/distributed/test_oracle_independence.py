"""The emulator is an independent oracle: it shares no code with what it checks,
its tables and LR are design.md's by hand, and a fault planted in the code under
test (a STEP one action late, an LR warm-up off by one) makes a distributed run
disagree with it, while the same run unplanted agrees to 1e-5."""

import ast
import math
import os
import re

import numpy as np
import pytest
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train
from pipeline_oracle import emulated_losses

import megatron_paci.pipeline.emulator as emulator
from megatron_paci.config.schema import OptimConfig
from megatron_paci.pipeline.emulator import RULES, learning_rate

EMULATOR = emulator.__file__


def test_the_emulator_imports_only_config_from_the_project():
    tree = ast.parse(open(EMULATOR).read())
    project = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            project.add(node.module)
        elif isinstance(node, ast.Import):
            project.update(a.name for a in node.names)
    project = {m for m in project if m.startswith("megatron_paci")}
    assert project == {"megatron_paci.config.schema"}, project


def _parse_cells(row: str) -> list[tuple[int, int]]:
    """'0/0 x4, 0/1 x3, 1/1' -> [(0, 0)] * 4 + [(0, 1)] * 3 + [(1, 1)]."""
    out = []
    for cell in row.split(","):
        m = re.fullmatch(r"\s*(\d+)/(\d+)(?: x(\d+))?\s*", cell)
        out += [(int(m[1]), int(m[2]))] * int(m[3] or 1)
    return out


# design.md, "Worked example, P = 4, a = m = M = 4", copied by hand.
WORKED = {
    "1f1b_flush": ["0/0 x4, 1/1 x4, 2/2 x4"] * 4,
    "pipedream_2bw": ["0/0 x8, 1/1 x4"] * 4,
    "paci": ["0/0 x4, 0/1 x3, 1/1, 1/2 x3, 2/2",
             "0/0 x4, 0/1 x2, 1/1 x2, 1/2 x2, 2/2 x2",
             "0/0 x4, 0/1, 1/1 x3, 1/2, 2/2 x3",
             "0/0 x4, 1/1 x4, 2/2 x4"],
}


@pytest.mark.parametrize("schedule", sorted(WORKED))
def test_oracle_tables_are_design_mds_worked_example(schedule):
    for s, row in enumerate(WORKED[schedule]):
        table = RULES[schedule].versions(4, s, 4, 3, 1)
        assert [table[j] for j in range(1, 13)] == _parse_cells(row), (schedule, s)


def test_oracle_paci_after_a_drain_starts_a_fresh_warm_up():
    # Windows 3..4 after a drain at the end of window 2 (P=4, a=4): stage 0's first
    # four forwards of the segment see the 2 earlier updates, not the live ones.
    table = RULES["paci"].versions(4, 0, 4, 2, 3)
    assert [table[j] for j in range(9, 17)] == _parse_cells("2/2 x4, 2/3 x3, 3/3")
    # PACI's drift bound ceil((P-s-1)/a) with a < P-1 (a=1, P=4, stage 0): 3 updates.
    table = RULES["paci"].versions(4, 0, 1, 6, 1)
    assert max(b - f for f, b in table.values()) == 3


def test_oracle_lr_by_hand():
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, lr_warmup_iters=2, lr_decay_style="cosine")
    lr = [learning_rate(cfg, 10, k) for k in (0, 1, 2, 6, 10, 20)]
    # warm-up 1/2, 2/2 of the peak; then cosine over updates 2..10, half way at 6.
    assert lr == pytest.approx([5e-3, 1e-2, 1e-2, 5.5e-3, 1e-3, 1e-3], rel=1e-12)
    cfg = OptimConfig(lr=1e-2, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="linear",
                      lr_decay_iters=4)
    assert [learning_rate(cfg, 10, k) for k in range(6)] == pytest.approx(
        [1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0, 0.0], abs=1e-15)
    cfg = OptimConfig(lr=1e-2, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="cosine")
    assert learning_rate(cfg, 3, 1) == pytest.approx(1e-2 * (1 + math.cos(math.pi / 3)) / 2)
    cfg = OptimConfig(lr=1e-2, lr_warmup_iters=4, lr_decay_style="constant")
    assert [learning_rate(cfg, 10, k) for k in (0, 3, 4, 9)] == pytest.approx(
        [2.5e-3, 1e-2, 1e-2, 1e-2])


# --- planted faults in the code under test ----------------------------------------

WINDOWS = 4


def _config(prefix, run_dir, schedule):
    return config(prefix, run_dir, WINDOWS, **{
        "model.num_layers": 4, "pipeline.schedule": schedule, "parallel.pipeline": 2,
        "optim.lr": 3e-3, "optim.lr_warmup_iters": 2, "pipeline.verify_versions": True})


def _step_one_action_late(original):
    """Each STEP the no-flush schedules place moves past the action that follows it."""
    def late(actions, window):
        out, held = [], None
        for a in original(actions, window):
            if a.kind == "STEP":
                held = a
                continue
            out.append(a)
            if held is not None:
                out.append(held)
                held = None
        return out + ([held] if held is not None else [])

    return late


def _warm_up_off_by_one(self, step):
    if self.warmup > 0 and step < self.warmup:
        return self.max_lr * step / self.warmup  # the first update at LR 0
    return _ORIGINAL_LR_AT[0](self, step)


_ORIGINAL_LR_AT = []


def _run(rank, world, prefix, root):
    from megatron_paci.optim.lr_schedule import LRSchedule
    from megatron_paci.parallel.state import initialize
    from megatron_paci.pipeline import schedules

    pstate = initialize(1, 2)
    _ORIGINAL_LR_AT.append(LRSchedule.lr_at)
    local_steps = schedules.local_steps
    out = {}
    for case, schedule in (("paci", "paci"), ("paci_late_step", "paci"),
                           ("flush_lr_off_by_one", "1f1b_flush")):
        if case == "paci_late_step":
            schedules.local_steps = _step_one_action_late(local_steps)
        if case == "flush_lr_off_by_one":
            LRSchedule.lr_at = _warm_up_off_by_one
        try:
            cfg = _config(prefix, os.path.join(root, case), schedule)
            trainer = train(cfg, pstate)
        finally:
            schedules.local_steps = local_steps
            LRSchedule.lr_at = _ORIGINAL_LR_AT[0]
        out[case] = {"losses": losses(cfg.run.dir) if trainer.log_enabled else None}
    return out


def test_a_planted_fault_in_the_code_under_test_is_caught(tmp_path, monkeypatch):
    prefix = make_dataset(str(tmp_path))
    res = spawn(_run, 2, args=(prefix, str(tmp_path)), timeout=300)
    logged = [r for r in res if r["paci"]["losses"] is not None][0]
    errors = {}
    for case, schedule in (("paci", "paci"), ("paci_late_step", "paci"),
                           ("flush_lr_off_by_one", "1f1b_flush")):
        got = np.array(logged[case]["losses"])
        cfg = _config(prefix, str(tmp_path / f"emu_{case}"), schedule)
        want = np.array(emulated_losses(cfg, 2, 1, WINDOWS))
        assert len(got) == WINDOWS
        errors[case] = float((np.abs(got - want) / np.abs(want)).max())
    assert errors["paci"] < 1e-5, errors  # the control: unplanted, the run agrees
    # The late STEP changes which version some forwards see, though the run's own
    # checks (verify_versions, the drift it reports) read the same faulty lists.
    assert errors["paci_late_step"] > 1e-4, errors
    assert errors["flush_lr_off_by_one"] > 1e-4, errors
    # Planted here too, the faults leave the oracle's losses unchanged bit for bit.
    from megatron_paci.optim.lr_schedule import LRSchedule
    from megatron_paci.pipeline import schedules

    clean = {s: emulated_losses(_config(prefix, str(tmp_path / f"c_{s}"), s), 2, 1, WINDOWS)
             for s in ("paci", "1f1b_flush")}
    _ORIGINAL_LR_AT[:] = [LRSchedule.lr_at]
    monkeypatch.setattr(schedules, "local_steps", _step_one_action_late(schedules.local_steps))
    monkeypatch.setattr(LRSchedule, "lr_at", _warm_up_off_by_one)
    for s, want in clean.items():
        assert emulated_losses(_config(prefix, str(tmp_path / f"p_{s}"), s), 2, 1,
                               WINDOWS) == want
