"""A resume across a change of the padded vocabulary (gloo, fp32, dropout 0).

200 tokens at make_vocab_size_divisible_by=24 pad to 216 rows in one process and to
240 at tp=2. One chain: one process to iteration 4, tp=2 to 8, one process to 12.
The iteration-4 checkpoint also grows into tp=2 x dp=2 ZeRO-1 blocks, which must train
what the tp=2 resume trains (1e-5 relative). After each load the real rows (and their
AdamW moments) must equal the checkpoint's bit for bit, and the new padding rows the
saved padding rows they copy. The losses are compared with an uninterrupted
one-process run: they cannot be bit-equal, since at tp=2 the softmax also covers 24
more padding rows (see WIDER and BACK).
"""

import shutil

import numpy as np
import torch
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

from megatron_paci.checkpoint.format import checkpoint_dir, load_checkpoint

EMB = "embedding.word_embeddings.weight"
VOCAB, ONE, TWO = 200, 216, 240
FIRST, SECOND, END = 4, 8, 12
# The tolerances. At tp=2 the softmax covers 24 more rows, copies of padding rows whose
# logits training only pushes down, so each adds at most about a uniform share 1/216 of
# the mass: the loss rises, by at most ln(1 + 24/216) = ln(240/216) = 0.105 (measured:
# 0.091 at iteration 5 falling to 0.071 at 8, as the padding is pushed down; zero rows,
# logit 0, measured 0.108). Back in one process at 216 rows, what is left is four
# iterations of gradients through that slightly wider softmax: measured at most 6e-4
# relative over iterations 9-12; allowed 2e-3. A wrong real row would fail the exact
# row checks first.
WIDER = float(np.log(TWO / ONE))
BACK = 2e-3


def cfg(prefix, run_dir, tp, **extra):
    return config(prefix, run_dir, END, **{
        "model.make_vocab_size_divisible_by": 24, "optim.lr": 3e-3,
        "checkpoint.load": True, "parallel.tensor": tp, **extra})


def _state(trainer):
    """The full embedding and its moments, gathered over tp (a collective)."""
    from megatron_paci.parallel import comm

    ps = trainer.pstate
    opt = trainer.optimizer.state_by_name()
    out = {"w": dict(trainer.model.named_parameters())[EMB].detach(),
           "m": opt[f"{EMB}.exp_avg"], "v": opt[f"{EMB}.exp_avg_sq"]}
    if ps.tensor_size > 1:
        out = {k: comm.all_gather(t.contiguous(), ps.tensor_group, "test", dim=0)
               for k, t in out.items()}
    return {k: t.clone() for k, t in out.items()}


def _resume_and_train(prefix, run_dir, tp, pstate=None, **extra):
    """The state right after the load, then the run continued (own process groups
    where ``tp`` > 1)."""
    from megatron_paci.training.trainer import Trainer

    trainer = Trainer(cfg(prefix, run_dir, tp, **extra), pstate)
    assert trainer.maybe_resume()
    loaded = _state(trainer)
    trainer.train()  # loads the same checkpoint again, then trains
    return loaded


def _tp2_worker(rank, world, prefix, run_dir):
    from megatron_paci.parallel.state import initialize

    return _resume_and_train(prefix, run_dir, 2, initialize(2, 1),
                             **{"train.exit_interval": SECOND})


def _zero1_worker(rank, world, prefix, run_dir):
    from megatron_paci.parallel.state import initialize

    trainer = train(cfg(prefix, run_dir, 2, **{"train.exit_interval": SECOND,
                                               "optim.distributed_optimizer": True}),
                    initialize(2, 1))
    return losses(run_dir) if trainer.log_enabled else None


def _saved(run_dir, iteration, rows):
    t = {"model": {EMB: torch.empty(rows, 32)},
         "optimizer": {f"{EMB}.exp_avg": torch.empty(rows, 32),
                       f"{EMB}.exp_avg_sq": torch.empty(rows, 32)}}
    load_checkpoint(checkpoint_dir(f"{run_dir}/checkpoints", iteration), t)
    return {"w": t["model"][EMB], "m": t["optimizer"][f"{EMB}.exp_avg"],
            "v": t["optimizer"][f"{EMB}.exp_avg_sq"]}


def test_padded_vocabulary_changes_across_tp_both_ways(tmp_path, capfd):
    prefix = make_dataset(str(tmp_path))
    reference = np.array(losses(train(cfg(prefix, str(tmp_path / "ref"), 1)).cfg.run.dir))
    run = str(tmp_path / "run")
    first = train(cfg(prefix, run, 1, **{"train.exit_interval": FIRST}))
    assert first.vocab_size == ONE

    zero1 = str(tmp_path / "zero1")
    shutil.copytree(run, zero1)
    loaded = spawn(_tp2_worker, 2, args=(prefix, run), timeout=300)[0]
    saved = _saved(run, FIRST, ONE)
    out = capfd.readouterr().out
    assert "the padded vocabulary changes from 216 to 240 rows" in out
    assert "the padded vocabulary changes 216 -> 240 rows" in out
    # Grow: rows as saved, then new row 216 + i copies saved padding row 200 + i % 16.
    order = list(range(ONE)) + [VOCAB + i % (ONE - VOCAB) for i in range(TWO - ONE)]
    for k in ("w", "m", "v"):
        assert np.array_equal(loaded[k], saved[k][order].numpy()), k

    back = _resume_and_train(prefix, run, 1)  # shrink: tp=2's checkpoint in one process
    saved = _saved(run, SECOND, TWO)
    for k in ("w", "m", "v"):
        assert torch.equal(back[k], saved[k][:ONE]), k

    got = np.array(losses(run))
    assert len(got) == END
    blocks = next(r for r in spawn(_zero1_worker, 4, args=(prefix, zero1), timeout=300) if r)
    zero_rel = np.abs(np.array(blocks[FIRST:]) - got[FIRST:SECOND]) / got[FIRST:SECOND]
    assert len(blocks) == SECOND and zero_rel.max() < 1e-5, (blocks, got)
    assert (got[:FIRST] == reference[:FIRST]).all()  # the same run until the first save
    wider = got[FIRST:SECOND] - reference[FIRST:SECOND]
    rel = np.abs(got[SECOND:] - reference[SECOND:]) / reference[SECOND:]
    print(f"converted resume vs uninterrupted: at tp=2 +{wider.min():.4f}..+{wider.max():.4f} "
          f"(bound {WIDER:.4f}); back at tp=1 max relative {rel.max():.1e}")
    assert (wider > 0).all() and (wider < WIDER).all(), (got, reference)
    assert rel.max() < BACK, (got, reference)
