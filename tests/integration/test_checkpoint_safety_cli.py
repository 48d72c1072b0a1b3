"""Damaged and asynchronous checkpoints through ``pretrain_gpt.py``, as a user meets them."""

import json
import os

import torch
from conftest import run_cli, tiny_overrides

from megatron_paci.checkpoint.format import load_checkpoint
from megatron_paci.checkpoint.integrity import read_dcp_metadata


def all_tensors(path):
    """Every tensor of a checkpoint, loaded into targets shaped from its own index."""
    md = read_dcp_metadata(path).state_dict_metadata
    flat = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in md.items()}
    nested = {}
    for k, t in flat.items():
        top, rest = k.split(".", 1)
        nested.setdefault(top, {})[rest] = t
    load_checkpoint(path, nested)
    return flat


def bits(t):
    return t.reshape(-1).view(torch.uint8)


def test_resume_falls_back_past_a_corrupted_newest_checkpoint(text_dataset, tmp_path):
    prefix, tok = text_dataset
    run = tmp_path / "run"
    cmd = ["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
        "checkpoint.interval": 3, "train.exit_interval": 6, "train.eval_interval": 0})]
    r = run_cli(cmd)
    assert r.returncode == 0, r.stderr
    ckpts = run / "checkpoints"
    old, new = ckpts / "iter_0000003", ckpts / "iter_0000006"
    shard = new / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))

    r = run_cli(cmd)
    assert r.returncode == 0, r.stderr
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1, r.stderr
    assert str(new) in warning[0] and str(old) in warning[0] and str(shard) in warning[0]
    assert f"resumed from {old} at iteration 3" in r.stdout
    iters = [json.loads(ln)["iteration"] for ln in open(run / "metrics.jsonl")
             if "loss" in json.loads(ln)]
    assert iters == [1, 2, 3, 4, 5, 6]  # rows after 3 were dropped and 4..6 trained again


def test_async_save_run_leaves_checkpoints_equal_to_a_sync_run(text_dataset, tmp_path):
    prefix, tok = text_dataset
    paths = {}
    for mode in ("false", "true"):
        run = tmp_path / f"async_{mode}"
        r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
            "checkpoint.interval": 2, "checkpoint.keep_last": 2, "train.eval_interval": 0,
            "checkpoint.async_save": mode})])
        assert r.returncode == 0, r.stderr
        ckpts = run / "checkpoints"
        assert sorted(os.listdir(ckpts)) == [
            "iter_0000006", "iter_0000008", "latest_checkpointed_iteration.txt"]
        assert all((ckpts / d / "manifest.json").is_file() for d in ("iter_0000006",
                                                                        "iter_0000008"))
        paths[mode] = ckpts
    # iter 6 was written while iterations 7 and 8 trained on: it must hold iteration 6.
    for name in ("iter_0000006", "iter_0000008"):
        sync, asyn = all_tensors(paths["false"] / name), all_tensors(paths["true"] / name)
        assert sync.keys() == asyn.keys() and any(k.startswith("optimizer.") for k in sync)
        for k in sync:  # bit for bit (an RNG record holds a NaN, so not torch.equal)
            assert sync[k].dtype == asyn[k].dtype and torch.equal(bits(sync[k]),
                                                                  bits(asyn[k])), (name, k)
