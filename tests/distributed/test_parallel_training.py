"""tp, dp, tp x dp, sequence parallel and ZeRO-1 runs equal one process (fp32, gloo).

Reference: the same model, data and seed trained in this process. Losses of
the first 10 iterations agree to 1e-5 relative; every parameter's gradient of
the first iteration, gathered over shards, agrees to 1e-5 relative (norm-wise).
"""

import os

import numpy as np
import pytest
from launcher import spawn
from parallel_equality import config, full_grads, losses, make_dataset, train

ITERS = 10
LAYOUTS_2 = {
    "tp2": {"parallel.tensor": 2},
    "dp2": {},
    "tp2_sp": {"parallel.tensor": 2, "parallel.sequence_parallel": True},
    "dp2_zero1": {"optim.distributed_optimizer": True},
}
LAYOUTS_4 = {
    "tp2_dp2": {"parallel.tensor": 2},
    "tp2_dp2_sp_zero1": {"parallel.tensor": 2, "parallel.sequence_parallel": True,
                         "optim.distributed_optimizer": True},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    prefix = make_dataset(str(d))
    grads = full_grads(train(config(prefix, str(d / "g"), 1)))
    train(config(prefix, str(d / "l"), ITERS))
    return prefix, losses(str(d / "l")), grads


def _run_layouts(rank, world, prefix, root, layouts):
    from megatron_paci.parallel.state import initialize

    out = {}
    for name, overrides in layouts.items():
        cfg = config(prefix, os.path.join(root, name, "g"), 1, **overrides)
        pstate = initialize(cfg.parallel.tensor, 1)
        grads = full_grads(train(cfg, pstate))
        cfg = config(prefix, os.path.join(root, name, "l"), ITERS, **overrides)
        trainer = train(cfg, pstate)
        out[name] = {"grads": grads if rank == 0 else None,
                     "losses": losses(cfg.run.dir) if trainer.log_enabled else None}
    return out


def _check(result, reference):
    _, ref_losses, ref_grads = reference
    for name, got in result.items():
        rel = np.abs(np.array(got["losses"]) - np.array(ref_losses)) / np.abs(ref_losses)
        assert len(got["losses"]) == ITERS and rel.max() < 1e-5, (name, rel.max())
        assert set(got["grads"]) == set(ref_grads), name
        for pname, ref in ref_grads.items():
            g = got["grads"][pname]
            assert g.shape == ref.shape, (name, pname)
            err = np.linalg.norm(g - ref) / max(np.linalg.norm(ref), 1e-12)
            assert err < 1e-5, (name, pname, err)


def test_two_ranks_equal_one_process(reference, tmp_path):
    res = spawn(_run_layouts, 2, args=(reference[0], str(tmp_path), LAYOUTS_2), timeout=240)
    _check(res[0], reference)


def test_four_ranks_tp2_dp2_equal_one_process(reference, tmp_path):
    res = spawn(_run_layouts, 4, args=(reference[0], str(tmp_path), LAYOUTS_4), timeout=240)
    _check(res[0], reference)
