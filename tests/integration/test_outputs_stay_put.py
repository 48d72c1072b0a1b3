"""A run writes only where the docs say (run.dir, data.cache_dir, wandb's own home
files), never into the working directory or beside the data when a cache directory is
named, and the wandb key reaches none of its output."""

import os
import shutil

from conftest import ROOT, run_cli, tiny_overrides

SECRET = "wandb-key-sentinel-3f9c2d7e1b"


def tree(root):
    return {os.path.relpath(os.path.join(d, f), root)
            for d, _, files in os.walk(root) for f in files}


def test_outputs_go_where_the_docs_say_and_the_wandb_key_nowhere(text_dataset, tmp_path):
    prefix, tokenizer = text_dataset
    data = tmp_path / "data"
    data.mkdir()
    for path in os.listdir(os.path.dirname(prefix)):  # the dataset, copied to watch it
        if path.startswith(os.path.basename(prefix)) and path.endswith((".bin", ".idx",
                                                                         ".json")):
            shutil.copy(os.path.join(os.path.dirname(prefix), path), data)
    cwd, home, cache, run = (tmp_path / n for n in ("cwd", "home", "cache", "run"))
    for d in (cwd, home):
        d.mkdir()
    before = tree(tmp_path)
    r = run_cli([os.path.join(ROOT, "pretrain_gpt.py"), "--config",
                 os.path.join(ROOT, "configs", "tiny.yaml"),
                 *tiny_overrides(str(data / os.path.basename(prefix)), tokenizer, run,
                                 **{"train.iters": 4, "checkpoint.interval": 2,
                                    "logging.plot": "true", "logging.wandb": "true",
                                    "pipeline.timeline": "true", "data.cache_dir": str(cache),
                                    "train.sample_tokens": 4})],
                cwd=str(cwd), env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline",
                                   "HOME": str(home), "WANDB_DIR": None,
                                   "WANDB_CONFIG_DIR": None, "WANDB_CACHE_DIR": None})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    new = tree(tmp_path) - before
    assert new, "the run wrote nothing"
    places = {p.split(os.sep, 1)[0] for p in new}
    assert places <= {"run", "cache", "home"}, sorted(new)
    assert {"run/config.yaml", "run/metrics.jsonl", "run/loss.png",
            "run/pipeline/timeline.png"} <= new
    assert any(p.startswith("run/checkpoints/iter_0000004/") for p in new)
    assert any(p.startswith("run/wandb/") for p in new)
    assert any(p.startswith("cache/") and p.endswith(".npy") for p in new)
    home_files = sorted(p for p in new if p.startswith("home/"))
    # Libraries' own caches under $HOME (matplotlib's font list, wandb's service logs):
    # named in docs/operations.md.
    assert all(p.startswith(("home/.cache/matplotlib/", "home/.cache/wandb/",
                             "home/.config/wandb/")) for p in home_files), home_files
    assert SECRET not in r.stdout + r.stderr
    for rel in new:
        with open(tmp_path / rel, "rb") as f:
            assert SECRET.encode() not in f.read(), rel
