"""The README's tp=2 x dp=2 command trains, samples and exits.

It used to hang at exit: the end-of-training sample ran on the logging rank alone,
and the vocab-parallel embedding's all-reduce waited for a tp peer that was already
in the shutdown barrier. The sample it prints must equal the one that the saved
checkpoint gives in one process (``generate`` with the run's seed), which also
checks that both tp ranks drew the same tokens.
"""

import os
import shlex

from conftest import ROOT, run_cli, run_shell

README_COMMAND = ("OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 pretrain_gpt.py "
                  "--config configs/tiny.yaml parallel.tensor=2")


def test_readme_tp_dp_command_exits_with_a_sample(text_dataset, tmp_path):
    prefix, tok = text_dataset
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert README_COMMAND.split("OMP_NUM_THREADS=1 ")[1] in readme  # still the documented one
    run = tmp_path / "run"
    overrides = [f"data.path=[{prefix}]", f"data.tokenizer={tok}", f"run.dir={run}",
                 "train.iters=4", "train.eval_interval=2", "logging.interval=2",
                 "logging.plot=true"]
    cmd = README_COMMAND + " " + " ".join(shlex.quote(o) for o in overrides)
    r = run_shell(cmd, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count(" iteration        4/       4 |") == 1
    assert "----- sample (prompt: 'The history of') -----" in r.stdout
    sample = r.stdout.split("----- sample (prompt: 'The history of') -----\n")[1]
    sample = sample.split("\n-----")[0]
    assert sample.startswith("The history of") and len(sample) > len("The history of")

    g = run_cli(["-m", "megatron_paci.training.generate", "--run-dir", str(run), "--prompt",
                 "The history of", "--seed", "1234"])  # configs/base.yaml's train.seed
    assert g.returncode == 0, g.stderr
    assert g.stdout.split(" -----\n", 1)[1].split("\n-----")[0] == sample
