"""Checkpoint manifest, asynchronous save and fallback with 2 ranks at tp=2: every
rank's shard is in the manifest, an async run equals a sync one, and after one
rank's shard of the newest checkpoint is damaged both ranks resume from the older one."""

import json
import os

import torch.distributed as dist
from launcher import spawn
from parallel_equality import config, losses, make_dataset, train

TP = {"parallel.tensor": 2, "optim.distributed_optimizer": False, "checkpoint.interval": 2}


def _runs(rank, world, prefix, root):
    from megatron_paci.parallel.state import initialize

    pstate = initialize(2, 1)
    train(config(prefix, os.path.join(root, "sync"), 8, **TP), pstate)
    asyn = os.path.join(root, "async")
    cfg = config(prefix, asyn, 8, **TP, **{"checkpoint.async_save": True,
                                           "checkpoint.load": True, "train.exit_interval": 6})
    train(cfg, pstate)  # stops at 6; its checkpoint at 4 was written while 5 and 6 ran
    if rank == 0:
        shard = os.path.join(asyn, "checkpoints", "iter_0000006", "__1_0.distcp")
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 3] ^= 0x01
        open(shard, "wb").write(bytes(data))
    dist.barrier()
    again = train(cfg, pstate)  # relaunch: resumes from 4, not the damaged 6; stops at 6
    last = train(cfg, pstate)  # from the new 6 to the end
    return again.progress.iteration, last.progress.iteration


def test_async_tp2_manifest_and_fallback_agree_on_every_rank(tmp_path, capfd):
    prefix = make_dataset(str(tmp_path))
    root = str(tmp_path / "runs")
    assert spawn(_runs, 2, args=(prefix, root), timeout=240) == [(6, 8), (6, 8)]
    for mode in ("sync", "async"):
        ckpt = os.path.join(root, mode, "checkpoints", "iter_0000004")
        files = json.load(open(os.path.join(ckpt, "manifest.json")))["files"]
        shards = sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"]
        assert set(shards) <= set(files)
    sync = losses(os.path.join(root, "sync"))
    asyn = losses(os.path.join(root, "async"))
    # Rows 5, 6 of the first async run were dropped at the resume from iteration 4
    # and trained again: the same numbers as the sync run (bit-exact).
    assert asyn == sync and len(sync) == 8
    err = capfd.readouterr().err
    warning = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1, err
    assert "iter_0000006/__1_0.distcp" in warning[0] and "iter_0000004" in warning[0]
