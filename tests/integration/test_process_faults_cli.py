"""Under torchrun, a rank that dies makes the other stop at once with a line naming
it; relaunching the same command resumes from the newest complete checkpoint."""

import re

from conftest import run_cli, tiny_overrides


def test_torchrun_a_dead_rank_is_named_and_the_relaunch_resumes(text_dataset, tmp_path):
    prefix, tok = text_dataset
    run = tmp_path / "run"
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
               "train.iters": 6, "train.eval_interval": 0, "parallel.pipeline": 2,
               "pipeline.schedule": "paci", "checkpoint.interval": 2,
               "parallel.timeout_s": 8})]
    # Rank 1 (the last stage) is SIGKILLed right after its STEP 3.
    r = run_cli(cmd, env={"MEGATRON_PACI_TEST_SIGNAL": "3:1:kill"}, timeout=120)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if "error: rank 0 " in x]
    assert len(errors) == 1, r.stderr[-3000:]
    # Whichever point-to-point op meets the dead connection first names the peer: a
    # receive ("from stage 1 (rank 1): ...") or a send ("to stage 1 (rank 1) failed: ...").
    assert re.search(r"(from|to) stage 1 \(rank 1\)( failed)?: .*(Connection|closed|reset)",
                     errors[0]), errors
    again = run_cli(cmd, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "iter_0000002" in again.stdout
