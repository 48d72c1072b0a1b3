"""Non-finite losses and spikes: the update is skipped where they appear, counted, and
the run stops after train.max_consecutive_skips; no checkpoint holds a bad state.

Faults are injected by a forward hook on the first stage's embedding that turns the
activations of chosen micro-batches into NaN (or scales them for a spike): the code
under test only sees what a diverging model would give it.
"""

import math
import os

import pytest
import torch
from launcher import spawn
from parallel_equality import config, make_dataset

from megatron_paci.training.numerics import TrainingDiverged

WINDOW = 4  # micro-batches per iteration: global 8 / micro 2 in one process


def poison(trainer, windows, how="nan"):
    """Make the training forwards of the given iterations' micro-batches go bad: NaN
    activations out of the embedding, or (one process) a loss ten times too large."""
    count = {"n": 0}

    def hook(module, args, out):
        if not module.training:
            return out
        count["n"] += 1
        if (count["n"] - 1) // WINDOW + 1 in windows:
            return out * math.nan if how == "nan" else out * 10.0
        return out

    module = trainer.model.embedding if how == "nan" else trainer.model
    module.register_forward_hook(hook)


def saved(run):
    return sorted(n for n in os.listdir(run / "checkpoints") if n.startswith("iter_"))


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def run_with_snapshots(trainer):
    """Train, keeping the weights and LR after every iteration."""
    snaps = {}
    after = trainer._after_step

    def record(k, loss, norm, skipped):
        after(k, loss, norm, skipped)
        snaps[k] = (weights(trainer), skipped, trainer.lr_schedule.lr)

    trainer._after_step = record
    trainer.train()
    return snaps


def test_one_bad_window_is_skipped_and_training_recovers(tmp_path, capsys):
    from megatron_paci.training.trainer import Trainer

    prefix = make_dataset(str(tmp_path))
    trainer = Trainer(config(prefix, str(tmp_path / "run"), 6))
    start = weights(trainer)
    poison(trainer, {3})
    snaps = run_with_snapshots(trainer)
    skipped = [k for k, (_, s, _) in sorted(snaps.items()) if s]
    assert skipped == [3]
    # The skipped update left every weight as it was after iteration 2 ...
    for name, w in snaps[2][0].items():
        assert torch.equal(snaps[3][0][name], w), name
        assert not torch.equal(w, start[name]), name  # (the others did move them)
    for name, w in snaps[3][0].items():
        assert not torch.equal(snaps[4][0][name], w), name
    # ... and still advanced the LR schedule, as every unskipped step does.
    # (the schedule's own formula is tested elsewhere: here, that it is stepped)
    assert [snaps[k][2] for k in range(1, 7)] == [trainer.lr_schedule.lr_at(k)
                                                   for k in range(1, 7)]
    assert snaps[3][2] != snaps[2][2]
    assert trainer.progress.skipped_iters == 1
    out = capsys.readouterr().out
    assert "iteration 3: non-finite loss (nan); update skipped on every stage (1 in a row of " \
           "train.max_consecutive_skips=10, 1 in total)" in out


def test_run_stops_after_max_consecutive_skips_and_saves_no_bad_state(tmp_path):
    from megatron_paci.training.trainer import Trainer

    prefix = make_dataset(str(tmp_path))
    run = tmp_path / "run"
    trainer = Trainer(config(prefix, str(run), 20, **{
        "train.max_consecutive_skips": 3, "checkpoint.interval": 1,
        "checkpoint.keep_last": 2}))
    poison(trainer, set(range(3, 21)))
    with pytest.raises(TrainingDiverged) as e:
        trainer.train()
    assert str(e.value).startswith(
        "training stopped at iteration 5: 3 consecutive updates skipped on every stage "
        "(iterations 3-5; last: non-finite loss (nan))")
    # Saves at 3 and 4 were refused (a run of skips), so keep-last still holds the two
    # last good checkpoints.
    assert saved(run) == ["iter_0000001", "iter_0000002"]


def test_a_non_finite_weight_is_never_saved(tmp_path, capsys):
    from megatron_paci.training.trainer import Trainer

    prefix = make_dataset(str(tmp_path))
    run = tmp_path / "run"
    trainer = Trainer(config(prefix, str(run), 2))
    trainer.train()
    assert trainer.save() is not None
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.inf
    assert trainer.save() is None
    assert "a weight or optimizer moment is not finite" in capsys.readouterr().out
    assert saved(run) == ["iter_0000002"]


def test_loss_spike_is_skipped_like_a_non_finite_loss(tmp_path, capsys):
    from megatron_paci.training.trainer import Trainer

    prefix = make_dataset(str(tmp_path))
    trainer = Trainer(config(prefix, str(tmp_path / "run"), 14, **{
        "train.loss_spike_factor": 3.0, "optim.lr": 1e-3}))
    poison(trainer, {13}, how="spike")
    snaps = run_with_snapshots(trainer)
    assert [k for k, (_, s, _) in sorted(snaps.items()) if s] == [13]
    for name, w in snaps[12][0].items():
        assert torch.equal(snaps[13][0][name], w), name
    assert "iteration 13: loss spike (a micro-batch loss above train.loss_spike_factor=3 x " \
           "the running mean" in capsys.readouterr().out


def _pipelined(rank, world, prefix, run_dir, windows, limit):
    from megatron_paci.parallel.state import initialize
    from megatron_paci.training.trainer import Trainer

    cfg = config(prefix, run_dir, 8, **{"parallel.pipeline": 2, "pipeline.schedule": "paci",
                                        "train.max_consecutive_skips": limit,
                                        "train.global_batch_size": 8})
    trainer = Trainer(cfg, initialize(1, 2))
    if trainer.stage.pre_process:
        global WINDOW
        WINDOW = trainer.num_micro_batches
        poison(trainer, windows)
    skipped = []
    after = trainer._after_step

    def record(k, loss, norm, was_skipped):
        if was_skipped:
            skipped.append(k)
        after(k, loss, norm, was_skipped)

    trainer._after_step = record
    try:
        trainer.train()
    except TrainingDiverged as e:
        return {"skipped": skipped, "stopped": str(e), "report": e.report}
    return {"skipped": skipped, "stopped": None}


def test_pipelined_stages_skip_the_same_window_on_their_own(tmp_path):
    """PACI: each stage decides alone; a NaN loss reaches every stage's gradient of
    that window, so both skip window 3, and both stop (and report) at the limit."""
    prefix = make_dataset(str(tmp_path))
    res = spawn(_pipelined, 2, args=(prefix, str(tmp_path / "a"), {3}, 10), timeout=120)
    assert [r["skipped"] for r in res] == [[3], [3]]
    assert [r["stopped"] for r in res] == [None, None]
    res = spawn(_pipelined, 2, args=(prefix, str(tmp_path / "b"), {3, 4, 5, 6, 7}, 2),
                timeout=120)
    for stage, r in enumerate(res):
        assert r["skipped"] == [3, 4] and r["report"], r
        assert r["stopped"].startswith(f"training stopped at iteration 4: 2 consecutive "
                                       f"updates skipped on stage {stage}"), r
