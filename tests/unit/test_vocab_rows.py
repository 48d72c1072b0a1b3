"""Vocabulary rows across a change of padding (checkpoint/vocab_rows.py), one process.

Expectations are written out row by row from the rule (real rows as saved, surplus
padding dropped, new padding rows copy the saved padding rows in turn), not taken
from the code's output.
"""

import pytest
import torch

from megatron_paci.checkpoint.format import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megatron_paci.checkpoint.vocab_rows import VocabRowLoad, converted_rows, saved_vocab_size

EMB, HEAD = "embedding.word_embeddings.weight", "output_layer.weight"


def rows(*values):
    """A [len(values), 2] tensor whose row i is (v, -v)."""
    return torch.tensor([[float(v), -float(v)] for v in values])


def test_grow_copies_saved_padding_rows_in_turn():
    saved = rows(0, 1, 2, 3, 4, 5)  # vocab 4: rows 4, 5 are padding
    assert torch.equal(converted_rows(saved, 4, 0, 9), rows(0, 1, 2, 3, 4, 5, 4, 5, 4))
    # A slice (a tp shard) is the same rows of the whole.
    assert torch.equal(converted_rows(saved, 4, 3, 6), rows(3, 4, 5))
    assert torch.equal(converted_rows(saved, 4, 6, 9), rows(4, 5, 4))


def test_shrink_drops_surplus_padding_and_no_padding_grows_with_zeros():
    saved = rows(0, 1, 2, 3, 4, 5)
    assert torch.equal(converted_rows(saved, 4, 0, 5), rows(0, 1, 2, 3, 4))
    assert torch.equal(converted_rows(saved, 4, 0, 4), rows(0, 1, 2, 3))
    exact = rows(0, 1, 2)  # no padding saved: nothing to copy
    assert torch.equal(converted_rows(exact, 3, 0, 5), rows(0, 1, 2, 0, 0))
    assert torch.equal(converted_rows(exact, 3, 4, 5), rows(0))


def _save(tmp_path, saved_rows, meta):
    """A checkpoint holding an embedding, an untied head, their moments and 2BW stash."""
    g = torch.Generator().manual_seed(0)
    t = {"model": {}, "optimizer": {}, "pipeline_stash": {}}
    for name in (EMB, HEAD):
        t["model"][name] = torch.randn(saved_rows, 3, generator=g)
        t["optimizer"][f"{name}.exp_avg"] = torch.randn(saved_rows, 3, generator=g)
        t["optimizer"][f"{name}.exp_avg_sq"] = torch.rand(saved_rows, 3, generator=g)
        t["optimizer"][f"{name}.step"] = torch.tensor(7.0)
        t["pipeline_stash"][name] = torch.randn(saved_rows, 3, generator=g)
    t["model"]["final_norm.weight"] = torch.ones(3)
    save_checkpoint(str(tmp_path), 7, t, meta, "model: {}\n")
    return latest_checkpoint(str(tmp_path)), t


def _targets(n):
    return {"model": {EMB: torch.zeros(n, 3), HEAD: torch.zeros(n, 3),
                      "final_norm.weight": torch.zeros(3)},
            "optimizer": {f"{p}.{k}": torch.zeros(n, 3) if k != "step" else torch.zeros(())
                          for p in (EMB, HEAD) for k in ("exp_avg", "exp_avg_sq", "step")},
            "pipeline_stash": {EMB: torch.zeros(n, 3), HEAD: torch.zeros(n, 3)}}


@pytest.mark.parametrize("new_rows", [13, 7])  # vocab 6, saved 9 rows: grow and shrink
def test_load_converts_weights_moments_and_stash(tmp_path, new_rows):
    from megatron_paci.checkpoint.parts import saved_tensor_keys

    path, saved = _save(tmp_path, 9, {"vocab_size": 6})
    tree = _targets(new_rows)
    kept = {s: dict(d) for s, d in tree.items()}
    load = VocabRowLoad(path, 6, saved_vocab_size(path, {"vocab_size": 6}, None))
    load.plan(tree, saved_tensor_keys(path))
    assert load.rows == (9, new_rows)
    load_checkpoint(path, tree)
    load.finish()
    # Hand-built: rows 0-5 real, 6-8 saved padding; a new row 9 + i copies row 6 + i % 3.
    order = list(range(9)) + [6, 7, 8, 6] if new_rows == 13 else list(range(7))
    for section in ("model", "optimizer", "pipeline_stash"):
        for key, t in saved[section].items():
            got = tree[section][key]
            assert got is kept[section][key]  # the caller's own target, filled in place
            want = t if t.ndim < 2 else t[order]
            assert torch.equal(got, want), (section, key)


def test_another_real_vocabulary_is_refused_naming_both(tmp_path):
    from megatron_paci.checkpoint.parts import saved_tensor_keys

    path, _ = _save(tmp_path, 9, {"vocab_size": 6})
    load = VocabRowLoad(path, 8, saved_vocab_size(path, {"vocab_size": 6}, None))
    with pytest.raises(CheckpointError, match="vocabulary of 6 tokens and this run has 8"):
        load.plan(_targets(12), saved_tensor_keys(path))
    # The same padded rows need no conversion and load as before.
    VocabRowLoad(path, 8, 6).plan(_targets(9), saved_tensor_keys(path))


def test_older_checkpoints_take_the_vocabulary_from_config_or_tokenizer(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  vocab_size: 300\n")
    assert saved_vocab_size(str(tmp_path), {}, 200) == 300
    (tmp_path / "config.yaml").write_text("model:\n  vocab_size: null\n")
    assert saved_vocab_size(str(tmp_path), {}, 200) == 200
    assert saved_vocab_size(str(tmp_path), {"vocab_size": 250}, 200) == 250
