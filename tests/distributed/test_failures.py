"""Bad layouts stop every rank with one message; a dead rank does not hang the rest."""

import contextlib
import io
import os
import time

from launcher import spawn
from parallel_equality import config, make_dataset

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")
BAD_LAYOUTS = [
    (["parallel.tensor=4"], "world size 2 is not divisible by parallel.tensor=4"),
    (["model.num_attention_heads=1", "model.hidden_size=32", "parallel.tensor=2"],
     "parallel.tensor=2 is larger than model.num_attention_heads=1"),
    (["model.num_attention_heads=3", "model.hidden_size=48", "parallel.tensor=2"],
     "model.num_attention_heads=3 is not divisible by parallel.tensor=2"),
    (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor > 1"),
]


def _launch_bad(rank, world, cases):
    import pretrain_gpt

    out = []
    for overrides, _ in cases:
        err = io.StringIO()
        code = None
        with contextlib.redirect_stderr(err):
            try:
                pretrain_gpt.main(["--config", TINY, *overrides])
            except SystemExit as e:
                code = e.code
        out.append((code, err.getvalue()))
    return out


def test_bad_layout_one_message_every_rank_exits():
    res = spawn(_launch_bad, 2, args=(BAD_LAYOUTS,), init_group=False, timeout=120)
    for i, (_, needle) in enumerate(BAD_LAYOUTS):
        (code0, err0), (code1, err1) = res[0][i], res[1][i]
        assert code0 == code1 == 2
        assert err0.count("error: ") == 1 and needle in err0, err0
        assert err1 == ""  # said once, by rank 0


def _die_mid_run(rank, world, prefix, run_dir):
    from megatron_paci.parallel.state import initialize
    from megatron_paci.training.trainer import Trainer

    cfg = config(prefix, run_dir, 50, **{"parallel.timeout_s": 20})
    trainer = Trainer(cfg, initialize(1, 1, timeout_s=20))
    calls = {"n": 0}
    step = trainer.executor._step

    def dying_step(action):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            os._exit(17)
        return step(action)

    trainer.executor._step = dying_step
    start = time.monotonic()
    try:
        trainer.train()
    except Exception as e:  # noqa: BLE001 - the point is that it raises
        return {"raised": type(e).__name__, "seconds": time.monotonic() - start}
    return {"raised": None}


def test_dead_rank_makes_the_others_exit(tmp_path):
    prefix = make_dataset(str(tmp_path))
    res = spawn(_die_mid_run, 2, args=(prefix, str(tmp_path / "run")), timeout=90,
                allow_failures=True, pg_timeout=20)
    assert "exit code 17" in res[1]
    assert isinstance(res[0], dict) and res[0]["raised"], res[0]
    assert res[0]["seconds"] < 30
