"""Bad launches stop with one message naming the file or key, before training starts."""

import os
import shutil

import numpy as np
import pytest
from conftest import run_cli, tiny_overrides


def copy_dataset(prefix, dst_dir):
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, os.path.join(dst_dir, "ds" + ext))
    return os.path.join(dst_dir, "ds")


def launch_fails(args, run_dir, *needles):
    r = run_cli(["pretrain_gpt.py", *args])
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in err[-1], (needle, err[-1])
    assert "iteration " not in r.stdout  # no training line was printed
    assert not os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
    return err[-1]


def test_unknown_key(text_dataset, tmp_path):
    prefix, tok = text_dataset
    launch_fails([*tiny_overrides(prefix, tok, tmp_path), "optim.learning_rate=1"], tmp_path,
                 "optim.learning_rate", "optim.lr")


def test_missing_data_path(text_dataset, tmp_path):
    _, tok = text_dataset
    missing = str(tmp_path / "nope" / "corpus_text_document")
    launch_fails(tiny_overrides(missing, tok, tmp_path), tmp_path, missing)


@pytest.mark.parametrize("damage", ["magic", "short_bin"])
def test_corrupt_dataset(text_dataset, tmp_path, damage):
    prefix, tok = text_dataset
    ds = copy_dataset(prefix, tmp_path)
    if damage == "magic":
        with open(ds + ".idx", "r+b") as f:
            f.write(b"NOTMMIDX\x00")
        needles = [ds + ".idx", "magic"]
    else:
        size = os.path.getsize(ds + ".bin")
        with open(ds + ".bin", "r+b") as f:
            f.truncate(size // 2)
        needles = [ds + ".bin"]
    launch_fails(tiny_overrides(ds, tok, tmp_path / "run"), tmp_path / "run", *needles)


def test_token_id_beyond_the_vocabulary(text_dataset, tmp_path):
    """One damaged token: refused before step 1 (it used to stop it with a traceback)."""
    prefix, tok = text_dataset
    ds = copy_dataset(prefix, tmp_path)
    tokens = np.fromfile(ds + ".bin", dtype="<u2")
    assert tokens.size > 1000 and tokens.max() < 512  # the tokenizer's vocabulary
    with open(ds + ".bin", "r+b") as f:
        f.seek(2 * 1000)
        f.write(np.array([9999], dtype="<u2").tobytes())
    run = tmp_path / "run"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(ds, tok, run)])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for needle in (ds + ".bin", "max token id 9999", f"data.tokenizer={tok}",
                   "vocabulary of 512", "at token 1000"):
        assert needle in errors[0], (needle, errors[0])
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


def test_tokenizer_larger_than_model_vocab(text_dataset, tmp_path):
    prefix, tok = text_dataset
    launch_fails([*tiny_overrides(prefix, tok, tmp_path), "model.vocab_size=100"], tmp_path,
                 tok, "512 tokens", "model.vocab_size=100")


def test_sequence_longer_than_position_table(text_dataset, tmp_path):
    prefix, tok = text_dataset
    launch_fails([*tiny_overrides(prefix, tok, tmp_path), "model.max_position_embeddings=16"],
                 tmp_path, "model.seq_length=32", "model.max_position_embeddings=16")


def test_sample_prompt_the_null_tokenizer_cannot_read(text_dataset, tmp_path):
    # A text prompt with token ids for data: it would only fail after the last step.
    prefix, _ = text_dataset
    launch_fails([*tiny_overrides(prefix, "null:600", tmp_path), "train.sample_tokens=8",
                  "train.sample_prompt=The history of"], tmp_path,
                 "train.sample_prompt='The history of'", "data.tokenizer=null:600",
                 "train.sample_tokens=0")


def test_missing_tokenizer(text_dataset, tmp_path):
    prefix, _ = text_dataset
    missing = str(tmp_path / "missing.model")
    launch_fails(tiny_overrides(prefix, missing, tmp_path), tmp_path, missing)


def test_tensorboard_requested_but_missing(text_dataset, tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    prefix, tok = text_dataset
    launch_fails([*tiny_overrides(prefix, tok, tmp_path), "logging.tensorboard=true"],
                 tmp_path, "logging.tensorboard=true", "pip install -e .[tensorboard]")


def test_tensorboard_missing_stops_every_rank_of_a_pipeline(text_dataset, tmp_path):
    """With 2 stages the logging rank is rank 1, which does not print bad-input
    errors; every rank checks the package, so rank 0 names it and no stage is left
    waiting on a peer that quit."""
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    prefix, tok = text_dataset
    r = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "pretrain_gpt.py", *tiny_overrides(prefix, tok, tmp_path),
                 "parallel.pipeline=2", "logging.tensorboard=true"], timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: logging.tensorboard=true but tensorboard is not installed "
                      "(pip install -e .[tensorboard])"], r.stderr[-2000:]
    assert "iteration " not in r.stdout
