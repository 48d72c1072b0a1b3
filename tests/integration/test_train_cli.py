"""Short real runs through ``pretrain_gpt.py``, as a user launches them."""

import json
import os

import matplotlib.image as mpimg
from conftest import ROOT, run_cli, tiny_overrides


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}, rows


def test_loss_falls_and_run_dir_contract(text_dataset, tmp_path):
    prefix, tok = text_dataset
    run = tmp_path / "run"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
        "train.iters": 40, "train.eval_interval": 20, "logging.plot": "true",
        "train.sample_tokens": 8, "train.sample_prompt": "The"})])
    assert r.returncode == 0, r.stderr
    by_iter, rows = losses(run)
    assert sorted(by_iter) == list(range(1, 41))  # logs every iteration
    first, last = by_iter[1], sum(by_iter[i] for i in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    for row in rows:
        if "loss" in row:
            assert {"iteration", "loss", "lr", "tokens", "elapsed_s"} <= set(row)
            assert row["tokens"] == row["iteration"] * 8 * 32
    assert any("val_loss" in row for row in rows)
    assert " iteration       40/      40 | consumed samples:          320 |" in r.stdout
    assert "validation loss at iteration 40" in r.stdout and "lm PPL" in r.stdout
    assert "----- sample (prompt: 'The') -----" in r.stdout
    assert (run / "config.yaml").read_text().count("num_layers: 2") == 1
    img = mpimg.imread(run / "loss.png")
    assert img.ndim == 3 and img.shape[0] > 100
    assert os.stat(run / "loss.png").st_mode & 0o777 == 0o644
    assert (run / "checkpoints" / "iter_0000040" / "meta.json").is_file()


def test_resume_equals_uninterrupted_run(text_dataset, tmp_path):
    """Stop at iteration 4, relaunch the same command: losses equal a straight run's."""
    prefix, tok = text_dataset
    common = {"model.dropout": 0.1, "model.attention_dropout": 0.1}  # RNG must resume too
    straight = tmp_path / "straight"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, straight, **common)])
    assert r.returncode == 0, r.stderr

    resumed = tmp_path / "resumed"
    cmd = ["pretrain_gpt.py", *tiny_overrides(prefix, tok, resumed, **common,
                                              **{"train.exit_interval": 4})]
    r1 = run_cli(cmd)
    assert r1.returncode == 0, r1.stderr
    assert "exiting at iteration 4" in r1.stdout
    assert sorted(losses(resumed)[0]) == [1, 2, 3, 4]
    r2 = run_cli(cmd)
    assert r2.returncode == 0, r2.stderr
    assert "resumed from" in r2.stdout and "at iteration 4" in r2.stdout

    a, b = losses(straight)[0], losses(resumed)[0]
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[i] for i in a] == [b[i] for i in a]  # exact, not approximate
    r3 = run_cli(cmd)  # a finished run relaunched does nothing
    assert r3.returncode == 0 and "nothing to do" in r3.stdout


def test_wandb_offline_without_a_key(text_dataset, tmp_path):
    prefix, tok = text_dataset
    run = tmp_path / "run"
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None, "WANDB_DIR": None}
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
        "train.iters": 2, "train.eval_interval": 0, "logging.wandb": "true",
        "checkpoint.save_at_end": "false"})], env=env)
    assert r.returncode == 0, r.stderr
    assert "logging offline" in r.stderr
    runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_torchrun_tensor_and_data_parallel(text_dataset, tmp_path):
    """The README's torchrun command: 2 processes, tp=2, then dp=2 with ZeRO-1."""
    prefix, tok = text_dataset
    for name, extra in (("tp", {"parallel.tensor": 2, "parallel.sequence_parallel": "true"}),
                        ("dp", {"optim.distributed_optimizer": "true"})):
        run = tmp_path / name
        r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     "pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
                         "train.iters": 3, "train.eval_interval": 0, **extra})])
        assert r.returncode == 0, r.stderr[-3000:]
        by_iter, rows = losses(run)
        assert sorted(by_iter) == [1, 2, 3]
        key = "comm_bytes_tp" if name == "tp" else "comm_bytes_dp"
        assert all(row[key] > 0 for row in rows if "loss" in row)
        assert r.stdout.count(" iteration        3/       3 |") == 1  # one logging rank


def test_apex_backend_trains_and_resumes_like_torch(text_dataset, tmp_path):
    """``kernels.backend=apex`` with apex importable (tests/fake_apex stands in for it):
    the start-up table names apex for its ops, and a run stopped and resumed on apex's
    FusedAdam follows torch's AdamW (a lost step count would change the resumed steps'
    bias correction and show here)."""
    prefix, tok = text_dataset
    with_apex = {"PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
         os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "fake_apex")])}
    reference = tmp_path / "torch"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, tok, reference)])
    assert r.returncode == 0, r.stderr

    run = tmp_path / "apex"
    cmd = ["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
        "kernels.backend": "apex", "train.exit_interval": 4})]
    r1 = run_cli(cmd, env=with_apex)
    assert r1.returncode == 0, r1.stderr
    table = r1.stdout.split("kernels:")[1]
    for op in ("layer_norm", "rms_norm", "adamw"):
        assert f"  {op:<16}  apex     kernels.backend: apex installed" in table, table
    assert "  bias_gelu         torch    kernels.backend=apex has no bias_gelu" in table
    r2 = run_cli(cmd, env=with_apex)
    assert r2.returncode == 0, r2.stderr
    assert "resumed from" in r2.stdout

    a, b = losses(reference)[0], losses(run)[0]
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for i in a:
        assert abs(a[i] - b[i]) <= 1e-5 * abs(a[i]), (i, a[i], b[i])


def _ranks_as_srun_starts_them(args, world, env=None):
    """``world`` processes of ``python ARGS`` with the rank variables srun gives each task
    (no torchrun: torchrun turns a worker's exit code into its own 1)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        full = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT,
                    RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                    LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], "".join(o for o, _ in out), "".join(e for _, e in out)


def test_stop_signal_exits_for_requeue_and_the_relaunch_finishes(text_dataset, tmp_path):
    """PACI on 2 stages started as srun starts tasks: a real SIGUSR1 on rank 1 at
    iteration 2 -> both ranks save at the drain of iteration 2 and exit 75
    (EXIT_REQUEUE, which the sbatch file requeues on); the same launch again finishes."""
    prefix, tok = text_dataset
    run = tmp_path / "run"
    args = ["pretrain_gpt.py", *tiny_overrides(prefix, tok, run, **{
        "train.iters": 4, "train.eval_interval": 0, "parallel.pipeline": 2,
        "pipeline.schedule": "paci", "train.exit_check_interval": 2})]
    codes, out, err = _ranks_as_srun_starts_them(args, 2, {"MEGATRON_PACI_TEST_SIGNAL": "2:1"})
    assert codes == [75, 75], err[-3000:]
    assert "saved and stopping at iteration 2: a stop signal" in out
    assert (run / "checkpoints" / "iter_0000002").is_dir()
    codes, out, err = _ranks_as_srun_starts_them(args, 2)
    assert codes == [0, 0], err[-3000:]
    assert sorted(losses(run)[0]) == [1, 2, 3, 4]


def test_exit_duration_saves_and_exits_for_requeue(text_dataset, tmp_path):
    """train.exit_duration_mins: the same stop as a signal, without one (one process)."""
    prefix, tok = text_dataset
    run = tmp_path / "run"
    base = tiny_overrides(prefix, tok, run, **{"train.iters": 4, "train.eval_interval": 0,
                                               "train.exit_check_interval": 2})
    first = run_cli(["pretrain_gpt.py", *base, "train.exit_duration_mins=1e-6"])
    assert first.returncode == 75, first.stderr[-3000:]
    assert "saved and stopping at iteration 2: train.exit_duration_mins reached" in first.stdout
    again = run_cli(["pretrain_gpt.py", *base])
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(losses(run)[0]) == [1, 2, 3, 4]


def test_diverging_pipeline_stops_with_one_line_per_stage(text_dataset, tmp_path):
    """optim.lr=1e3 under PACI on 2 stages: updates turn non-finite, each stage skips on
    its own and stops at train.max_consecutive_skips with its own error line; exit 1."""
    prefix, tok = text_dataset
    # through the launcher the size scripts use (torchrun's own failure report trimmed)
    r = run_cli(["scripts/torchrun_quiet.py", "torchrun", "--standalone", "--nproc_per_node",
                 "2", "pretrain_gpt.py", *tiny_overrides(prefix, tok, tmp_path / "run", **{
                     "train.iters": 30, "train.eval_interval": 0, "optim.lr": 1e3,
                     "optim.lr_warmup_iters": 0, "train.max_consecutive_skips": 2,
                     "parallel.pipeline": 2, "pipeline.schedule": "paci",
                     "checkpoint.save_at_end": "false"})])
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    stages = sorted(e.split("skipped on ")[1][:7] for e in errors if "consecutive" in e)
    assert stages == ["stage 0", "stage 1"], r.stderr[-3000:]
    assert all("training stopped at iteration" in e for e in errors[:2]), errors
    assert errors[-1].endswith("with exit code 1"), errors  # the launcher's one line
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
