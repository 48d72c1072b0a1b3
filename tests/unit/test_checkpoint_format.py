import os
import pickle

import pytest
import torch

from megatron_paci.checkpoint.format import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
            "optimizer": {"w.step": torch.tensor(float(seed))}}


def zeros_like(s):
    return {k: zeros_like(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in s.items()}


def test_round_trip_and_meta(tmp_path):
    root = str(tmp_path / "checkpoints")
    src = state(1)
    save_checkpoint(root, 5, src, {"consumed_samples": 80}, "model: {}\n")
    dst = zeros_like(src)
    meta = load_checkpoint(latest_checkpoint(root), dst)
    assert meta["iteration"] == 5 and meta["consumed_samples"] == 80
    assert torch.equal(dst["model"]["w"], src["model"]["w"])
    assert torch.equal(dst["optimizer"]["w.step"], src["optimizer"]["w.step"])
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read() == "5\n"


def test_newest_complete_wins_and_partial_is_ignored(tmp_path):
    root = str(tmp_path)
    save_checkpoint(root, 10, state(1), {}, "")
    save_checkpoint(root, 20, state(2), {}, "")
    # A crash mid-save leaves only a .partial directory, and an incomplete iter dir.
    os.makedirs(checkpoint_dir(root, 30) + ".partial")
    os.makedirs(checkpoint_dir(root, 40))
    assert latest_checkpoint(root) == checkpoint_dir(root, 20)


def test_keep_last(tmp_path):
    for it in (1, 2, 3):
        save_checkpoint(str(tmp_path), it, state(it), {}, "", keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000003",
                                            "latest_checkpointed_iteration.txt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_metadata_with_code_is_refused(tmp_path):
    root = str(tmp_path)
    path = save_checkpoint(root, 1, state(1), {}, "")
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path, zeros_like(state(1)))


def test_shape_mismatch_is_a_clear_error(tmp_path):
    path = save_checkpoint(str(tmp_path), 1, state(1), {}, "")
    bad = zeros_like(state(1))
    bad["model"]["w"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError, match="could not load checkpoint"):
        load_checkpoint(path, bad)
