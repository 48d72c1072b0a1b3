"""``pretrain_gpt.py --dry-run`` through the command line: fields, verdicts, exit codes."""

from conftest import run_cli

from megatron_paci.pipeline.registry import schedule_names

# GPT-2 Medium, V padded to 50304, s = 1024, tied head: 12Lh^2 + 13Lh + (V + S)h + 2h.
MEDIUM_PARAMS = 12 * 24 * 1024**2 + 13 * 24 * 1024 + (50304 + 1024) * 1024 + 2 * 1024
# tests/unit/test_flops.py's hand count for the same model.
MEDIUM_FLOPS = 2_121_007_104 + 150_994_944


def dry_run(*args):
    return run_cli(["pretrain_gpt.py", *args, "--dry-run"], timeout=120,
                   env={"CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": None, "MASTER_PORT": None})


def test_gpt2_medium_on_8_gpus_fits():
    r = dry_run("--config", "configs/gpt2_medium.yaml", "--world-size", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "layout: tensor 1 x pipeline 1 x data 8 = world 8" in out
    assert "stage 0: ranks 0-7: embedding + layers 0-23 + final norm" in out
    assert "7 (0,7,0)" in out  # rank 7 = tp 0, dp 7, pp 0
    assert f"model: {MEDIUM_PARAMS / 1e6:.2f}M parameters" in out
    assert f"flops: {MEDIUM_FLOPS / 1e9:.3f} GFLOP per token" in out
    assert "model.num_layers = 24" in out and "train.micro_batch_size = 8" in out
    for name in schedule_names():
        assert f"\n  {name}" in out, name
    for field in ("weights", "grads", "optimizer", "activations", "bubble"):
        assert field in out
    assert out.strip().splitlines()[-1].startswith("fits: yes")
    assert "Traceback" not in r.stderr


def test_a_layout_that_does_not_fit_says_why_and_exits_1():
    r = dry_run("--config", "configs/paci_gpt2_medium.yaml", "--world-size", "8",
                "--gpu-memory-gb", "16")
    assert r.returncode == 1, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("fits: no, pipeline.schedule=paci") and "activations" in last
    assert "stage 7: ranks 7-7: layers 21-23 + final norm, output layer, loss" in r.stdout


def test_a_layout_that_cannot_divide_prints_one_error_line_and_exits_2():
    r = dry_run("--config", "configs/gpt2_medium.yaml", "--world-size", "6")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: train.global_batch_size=512 is not divisible by train.micro_batch_size=8 x "
        "data-parallel size 6 (world 6 / (tensor 1 x pipeline 1))"]
