import os
import pickle
import subprocess
import sys

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


# --- inspect -------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_inspect(*args):
    """The command line as a user runs it (a fresh process, exit code and streams)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_paci.checkpoint.inspect", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def inspect_main(capsys, monkeypatch):
    """The same entry point in this process (importing torch per call is slow here)."""
    from types import SimpleNamespace

    from megatron_paci.checkpoint.inspect import main

    monkeypatch.chdir(ROOT)

    def run(*args):
        rc = main(list(args))
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)
    return run


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A run dir holding a checkpoint of a real (tiny) GPT, saved with its config."""
    from megatron_paci.config.loader import load_config, to_yaml
    from megatron_paci.model.gpt import GPTModel

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      ["model.num_layers=2", "model.hidden_size=32", "train.iters=12"])
    model = GPTModel(cfg.model, vocab_size=256)
    run = tmp_path_factory.mktemp("run")
    meta = {"consumed_samples": 96, "schedule": "paci",
            "layout": {"world": 4, "tensor": 2, "pipeline": 2, "data": 1}}
    save_checkpoint(str(run / "checkpoints"), 6, {"model": model.state_dict()}, meta,
                    to_yaml(cfg))
    shapes = {f"model.{n}": (tuple(t.shape), str(t.dtype).removeprefix("torch."))
              for n, t in model.state_dict().items()}
    return run, shapes


def test_inspect_lists_every_tensor_without_reading_tensor_data(gpt_run, tmp_path, inspect_main):
    run, shapes = gpt_run
    # Metadata only: a copy without any .distcp shard still inspects.
    import shutil

    copy = tmp_path / "iter_0000006"
    shutil.copytree(run / "checkpoints" / "iter_0000006", copy)
    for name in os.listdir(copy):
        if name.endswith(".distcp"):
            os.remove(copy / name)
    r = inspect_main(str(copy))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "iteration: 6" in out and "consumed samples: 96" in out
    assert "layout: world 4, tensor 2, pipeline 2, data 1" in out and "schedule: paci" in out
    rows = {ln.split()[0]: ln for ln in out if ln.startswith("  model.")}
    assert set(rows) == set(shapes) and f"tensors: {len(shapes)}" in out
    for name, (shape, dtype) in shapes.items():
        assert rows[name].split(None, 1)[1].startswith(str(list(shape))), rows[name]
        assert rows[name].endswith(dtype)


def test_inspect_finds_the_newest_checkpoint_from_a_run_or_checkpoints_dir(gpt_run, inspect_main):
    run, _ = gpt_run
    for d in (run, run / "checkpoints"):
        r = inspect_main(str(d))
        assert r.returncode == 0, r.stderr
        assert f"checkpoint: {run / 'checkpoints' / 'iter_0000006'}" in r.stdout


def test_inspect_config_diff(gpt_run, inspect_main):
    run, _ = gpt_run
    r = inspect_main(str(run), "--config", "configs/tiny.yaml", "model.num_layers=2",
                    "model.hidden_size=32", "train.iters=99")
    assert r.returncode == 0, r.stderr
    assert "config diff against configs/tiny.yaml (key: saved -> given): 1 keys" in r.stdout
    assert "  train.iters: 12 -> 99" in r.stdout.splitlines()
    r = inspect_main(str(run), "--config", "configs/tiny.yaml")  # tiny's own 4 layers, 128 wide
    assert "  model.num_layers: 2 -> 4" in r.stdout.splitlines()
    assert "  model.hidden_size: 32 -> 128" in r.stdout.splitlines()


def test_inspect_verify_reads_the_data(gpt_run, inspect_main):
    run, _ = gpt_run
    r = inspect_main(str(run), "--verify")
    assert r.returncode == 0 and "verify: every file matches manifest.json" in r.stdout


def test_inspect_bad_input_is_one_error_line(tmp_path, inspect_main):
    empty = tmp_path / "empty"
    os.makedirs(empty / "checkpoints" / "iter_0000003.partial")
    r = run_inspect(str(empty))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"error: {empty / 'checkpoints'}: no complete checkpoint (expected iter_NNNNNNN/ "
        "holding meta.json and .metadata)"]
    path = save_checkpoint(str(tmp_path / "c"), 1, state(1), {}, "")
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(b"\x80\x04garbage")
    r = inspect_main(path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"error: {os.path.join(path, '.metadata')}: unreadable DCP index")
    r = inspect_main(str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'nowhere'}: no such directory\n"
    r = inspect_main(path, "--config", "configs/none.yaml")
    assert r.returncode == 2 and r.stderr.startswith("error: config file not found")


def test_inspect_help_describes_every_option():
    r = run_inspect("--help")
    assert r.returncode == 0
    for opt in ("DIR", "--config CONFIG", "--verify", "section.key=value"):
        assert opt in r.stdout
