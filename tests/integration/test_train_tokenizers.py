"""Byte-level BPE and tokenizer.json from corpus to training and sampling, through the CLIs."""

import json
import math
import os
import shutil

import pytest
from conftest import run_cli, tiny_overrides


@pytest.fixture(scope="module")
def bpe_data(text_dataset, tmp_path_factory):
    """(bpe directory, dataset prefix made with it, same via tokenizer.json) on real text."""
    corpus = os.path.join(os.path.dirname(text_dataset[0]), "corpus.jsonl")
    d = tmp_path_factory.mktemp("bpe")
    bpe = str(d / "bpe")
    steps = [
        ["-m", "data_prep.train_tokenizer", "--type", "bpe", "--input", corpus,
         "--vocab-size", "512", "--output", bpe],
        ["-m", "data_prep.preprocess", "--input", corpus, "--tokenizer", bpe,
         "--output-prefix", str(d / "gpt2_text_document"), "--append-eod", "--workers", "2"],
        ["-m", "data_prep.preprocess", "--input", corpus, "--tokenizer",
         os.path.join(bpe, "tokenizer.json"), "--output-prefix", str(d / "hf_text_document"),
         "--append-eod", "--workers", "1"],
    ]
    for args in steps:
        r = run_cli(args)
        assert r.returncode == 0, r.stdout + r.stderr
    return bpe, str(d / "gpt2_text_document"), str(d / "hf_text_document")


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_gpt2_bpe_trains_and_samples(bpe_data, tmp_path):
    bpe, prefix, _ = bpe_data
    run = tmp_path / "run"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, bpe, run, **{
        "train.iters": 8, "train.eval_interval": 0, "train.sample_tokens": 8,
        "train.sample_prompt": "The"})])
    assert r.returncode == 0, r.stderr
    assert "no tokenizer record" not in r.stdout  # the record was there and checked
    losses = _losses(run)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(512) - 1.0  # starts near uniform over the vocabulary
    assert sum(losses[-3:]) / 3 < losses[0]
    assert "----- sample (prompt: 'The') -----" in r.stdout

    g = run_cli(["-m", "megatron_paci.training.generate", "--run-dir", str(run), "--prompt",
                 "The history", "--tokens", "6"])
    assert g.returncode == 0, g.stderr
    body = g.stdout.split("-----\n", 1)[1]
    assert body.startswith("The history")


def test_tokenizer_json_trains(bpe_data, tmp_path):
    bpe, _, prefix = bpe_data
    run = tmp_path / "run"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(
        prefix, os.path.join(bpe, "tokenizer.json"), run,
        **{"train.iters": 3, "train.eval_interval": 0, "checkpoint.save_at_end": "false"})])
    assert r.returncode == 0, r.stderr
    losses = _losses(run)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_dataset_of_another_tokenizer_is_refused(bpe_data, text_dataset, tmp_path):
    bpe, prefix, _ = bpe_data
    _, sp_model = text_dataset  # the sentencepiece model of the other datasets
    run = tmp_path / "run"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(prefix, sp_model, run)])
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for needle in (f"dataset {prefix} ", prefix + ".tokenizer_info.json",
                   os.path.join(bpe, "vocab.json"), f"data.tokenizer={sp_model}",
                   "sentencepiece", "gpt2-bpe"):
        assert needle in errors[0], (needle, errors[0])
    assert "iteration " not in r.stdout
    assert not os.path.exists(run / "metrics.jsonl")


def test_dataset_without_record_trains_unchecked(bpe_data, tmp_path):
    bpe, prefix, _ = bpe_data
    bare = str(tmp_path / "megatron_made")
    for ext in (".bin", ".idx"):  # what Megatron's own preprocessing leaves
        shutil.copy(prefix + ext, bare + ext)
    run = tmp_path / "run"
    r = run_cli(["pretrain_gpt.py", *tiny_overrides(bare, bpe, run, **{
        "train.iters": 2, "train.eval_interval": 0, "checkpoint.save_at_end": "false"})])
    assert r.returncode == 0, r.stderr
    assert f"data: {bare}: no tokenizer record" in r.stdout
    assert len(_losses(run)) == 2
