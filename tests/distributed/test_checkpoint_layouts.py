"""One checkpoint format across layouts and schedules (gloo, fp32, dropout 0).

1F1B-flush at any layout trains what one process trains, so a checkpoint saved at
iteration 10 in one layout and resumed to 14 in another must give iterations 11-14 of
an uninterrupted one-process run (1e-5 relative): tp2 x pp2 -> 1 process, and
1 process -> tp2, -> dp2 with ZeRO-1, -> pp2. The asynchronous schedules have no such
reference, so their conversions must continue the loss curve without a jump: pp2 PACI
(untied head) -> 1 process, and PipeDream-2BW <-> PACI.
"""

import os
import shutil

import numpy as np
import pytest
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

SAVE, END = 10, 14


def cfg_for(prefix, run_dir, **extra):
    return config(prefix, run_dir, END, **{
        "model.num_layers": 4, "optim.lr": 3e-3, "checkpoint.load": True, **extra})


def _phases(rank, world, prefix, tp, pp, phases):
    """Run (run_dir, overrides) phases in order on one set of process groups."""
    from megatron_paci.parallel.state import initialize

    pstate = initialize(tp, pp)
    out = []
    for run_dir, extra in phases:
        trainer = train(cfg_for(prefix, run_dir, **{"parallel.tensor": tp,
                                                    "parallel.pipeline": pp, **extra}), pstate)
        out.append(losses(run_dir) if trainer.log_enabled else None)
    return out


def _logged(results, phase):
    rows = [r[phase] for r in results if r[phase] is not None]
    assert len(rows) == 1
    return np.array(rows[0])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("layouts")))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted one-process run to iteration 14."""
    run = str(tmp_path_factory.mktemp("ref") / "run")
    return np.array(losses(train(cfg_for(dataset, run)).cfg.run.dir))


def _assert_tail_equal(got, reference):
    assert len(got) == END
    rel = np.abs(got[SAVE:] - reference[SAVE:]) / np.abs(reference[SAVE:])
    assert rel.max() < 1e-5, (got[SAVE:], reference[SAVE:])


def test_tp2_pp2_checkpoint_resumes_in_one_process(dataset, reference, tmp_path):
    run = str(tmp_path / "run")
    res = spawn(_phases, 4, args=(dataset, 2, 2, [(run, {"train.exit_interval": SAVE})]),
                timeout=300)
    assert len(_logged(res, 0)) == SAVE
    resumed = train(cfg_for(dataset, run))
    assert resumed.progress.iteration == END
    _assert_tail_equal(np.array(losses(run)), reference)


def test_one_process_checkpoint_resumes_at_tp2_dp2_zero1_and_pp2(dataset, reference,
                                                                  tmp_path):
    saved = str(tmp_path / "saved")
    train(cfg_for(dataset, saved, **{"train.exit_interval": SAVE}))
    assert len(losses(saved)) == SAVE
    for name, tp, pp, extra in (("tp2", 2, 1, {}),
                                ("dp2_zero1", 1, 1, {"optim.distributed_optimizer": True}),
                                ("pp2", 1, 2, {"pipeline.schedule": "1f1b_flush"})):
        run = str(tmp_path / name)
        shutil.copytree(saved, run)
        res = spawn(_phases, 2, args=(dataset, tp, pp, [(run, extra)]), timeout=300)
        _assert_tail_equal(_logged(res, 0), reference)


def test_pp2_paci_untied_checkpoint_in_one_process(dataset, tmp_path):
    run = str(tmp_path / "paci")
    res = spawn(_phases, 2, args=(dataset, 1, 2, [(run, {"pipeline.schedule": "paci",
                                                          "train.exit_interval": SAVE})]),
                timeout=300)
    last_saved = _logged(res, 0)[-1]
    from megatron_paci.checkpoint.format import CheckpointError

    # One process ties by default: the trained head differs from the embedding, so the
    # silent drop of old is now an error naming the two ways out.
    with pytest.raises(CheckpointError, match="model.tie_embeddings=false.*use_embedding"):
        train(cfg_for(dataset, run))
    kept = str(tmp_path / "kept")
    shutil.copytree(run, kept)
    train(cfg_for(dataset, kept, **{"model.tie_embeddings": False}))
    first = losses(kept)[SAVE]
    assert abs(first - last_saved) / last_saved < 0.01, (first, last_saved)
    tied = str(tmp_path / "tied")
    shutil.copytree(run, tied)
    train(cfg_for(dataset, tied, **{"checkpoint.untied_head": "use_embedding"}))
    assert len(losses(tied)) == END


def test_2bw_and_paci_checkpoints_resume_under_each_other(dataset, tmp_path):
    a, b = str(tmp_path / "2bw_to_paci"), str(tmp_path / "paci_to_2bw")
    phases = [(a, {"pipeline.schedule": "pipedream_2bw", "train.exit_interval": SAVE}),
              (a, {"pipeline.schedule": "paci"}),
              (b, {"pipeline.schedule": "paci", "train.exit_interval": SAVE}),
              (b, {"pipeline.schedule": "pipedream_2bw"})]
    res = spawn(_phases, 2, args=(dataset, 1, 2, phases), timeout=300)
    for saved, resumed in ((0, 1), (2, 3)):
        before, after = _logged(res, saved), _logged(res, resumed)
        assert len(before) == SAVE and len(after) == END
        assert (after[:SAVE] == before).all()  # the history is kept, not rewritten
        assert abs(after[SAVE] - before[-1]) / before[-1] < 0.01, (after[SAVE], before[-1])
    assert os.path.isdir(os.path.join(b, "checkpoints"))
