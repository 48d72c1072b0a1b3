"""``generate --checkpoint``: an iteration or a checkpoint directory; the newest by
default; a missing one is one error line listing what exists."""

from conftest import run_cli, tiny_overrides


def _sample(r):
    assert r.returncode == 0, r.stderr
    head, body = r.stdout.split(" -----\n", 1)
    return head, body.split("\n-----")[0]


def test_pick_a_checkpoint(text_dataset, tmp_path):
    prefix, tok = text_dataset
    run = tmp_path / "run"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
        "train.iters": 4, "checkpoint.interval": 2, "train.eval_interval": 0})])
    assert r.returncode == 0, r.stderr
    gen = ["-m", "megatron_paci.training.generate", "--prompt", "The", "--tokens", "12"]

    head, newest = _sample(run_cli([*gen, "--run-dir", str(run)]))
    assert f"sample from {run}/checkpoints/iter_0000004 " in head
    head, at_2 = _sample(run_cli([*gen, "--run-dir", str(run), "--checkpoint", "2"]))
    assert f"sample from {run}/checkpoints/iter_0000002 " in head
    _, by_dir = _sample(run_cli([*gen, "--checkpoint", str(run / "checkpoints/iter_0000002")]))
    assert by_dir == at_2 and at_2.startswith("The")
    assert newest != at_2  # two more steps changed the weights (same seed, same prompt)

    r = run_cli([*gen, "--run-dir", str(run), "--checkpoint", "3"])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: --checkpoint 3: no complete checkpoint at that iteration under "
        f"{run}/checkpoints; available iterations: 2, 4"]
    r = run_cli([*gen, "--checkpoint", str(tmp_path)])
    assert r.returncode == 2 and r.stderr.startswith(f"error: --checkpoint {tmp_path}: no ")
