"""The executor's action times with a clock whose marks complete late, as CUDA events do.

On a GPU an action's end mark completes only when the device gets there. The executor
must then read times without waiting mid-segment (a wait is a host-device sync) and
still account for every action by the drain. A virtual clock stands in for the device
here: each mark is one tick later than the last, and a mark completes only once
``LAG`` newer marks exist or it is waited for.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "distributed"))
from parallel_equality import config, make_dataset  # noqa: E402

LAG = 3
ITERS, MICRO_BATCHES = 3, 2


def _trained(tmp_path, **overrides):
    """A single-stage run of ITERS iterations of MICRO_BATCHES micro-batches."""
    from megatron_paci.training.trainer import Trainer

    cfg = config(make_dataset(str(tmp_path)), str(tmp_path / "run"), ITERS,
                 **{"train.global_batch_size": 2 * MICRO_BATCHES, **overrides})
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


class LaggingClock:
    def __init__(self) -> None:
        self.ticks = 0
        self.completed = -1  # marks up to this tick have completed
        self.waits = 0

    def mark(self) -> int:
        self.ticks += 1
        self.completed = max(self.completed, self.ticks - LAG)
        return self.ticks

    def done(self, mark: int) -> bool:
        return mark <= self.completed

    def wait(self, mark: int) -> None:
        self.waits += 1
        self.completed = max(self.completed, mark)

    def seconds(self, start: int, end: int) -> float:
        assert self.done(start) and self.done(end), "read a mark that has not completed"
        return (end - start) * 1e-3


def test_lagging_clock_is_read_without_mid_segment_waits(tmp_path, monkeypatch):
    from megatron_paci.pipeline import executor as executor_module

    clock = LaggingClock()
    monkeypatch.setattr(executor_module, "clock_for", lambda device: clock)
    trainer = _trained(tmp_path, **{"pipeline.timeline": True})
    tel = trainer.executor.telemetry

    # One segment (no eval, no checkpoint): one wait, at its drain, and every action read.
    assert clock.waits == 1
    assert trainer.executor._marks == []
    assert tel.kind_n == {"F": ITERS * MICRO_BATCHES, "B": ITERS * MICRO_BATCHES, "S": ITERS}
    # Each action spans start mark -> end mark with no mark between: one tick each.
    actions = sum(tel.kind_n.values())
    assert tel.busy_s == pytest.approx(actions * 1e-3)
    assert [e[3] - e[2] for e in tel.events] == pytest.approx([1e-3] * actions)
    starts = [e[2] for e in tel.events]
    assert starts == sorted(starts)
    assert 0.0 < trainer.executor.measured_bubble() < 1.0


@pytest.mark.parametrize("dump", [False, True])
def test_version_rows_kept_only_for_the_dump(tmp_path, dump):
    """A long run must not hold a row per micro-batch: only pipeline.dump_versions
    (or verify_versions) keeps them; the drift the log reports is a running maximum."""
    tel = _trained(tmp_path, **{"pipeline.dump_versions": dump}).executor.telemetry
    assert tel.max_drift() == 0  # one stage: nothing crosses an update
    if dump:
        assert sorted(tel.versions) == [(0, j) for j in range(1, ITERS * MICRO_BATCHES + 1)]
        csv = (tmp_path / "run" / "pipeline" / "versions_stage0.csv").read_text()
        assert len(csv.splitlines()) == 1 + ITERS * MICRO_BATCHES
    else:
        assert tel.versions == {}


def test_an_in_process_training_run_leaves_the_signal_handlers_as_they_were(tmp_path):
    """Trainer.train catches SIGTERM/SIGUSR1 only while it runs: a library or test caller
    keeps its default handlers (multiprocessing's terminate relies on SIGTERM)."""
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    _trained(tmp_path)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
