"""Hugging Face export and import through the command line, with real training runs."""

import json
import os

import pytest
import torch
from conftest import run_cli, tiny_overrides

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from megatron_paci.data.gpt_dataset import build_gpt_datasets  # noqa: E402
from megatron_paci.data.sampler import build_pretraining_data_loader  # noqa: E402
from megatron_paci.training.generate import load_for_generation  # noqa: E402

TORCHRUN = ["-m", "torch.distributed.run", "--standalone"]


def first_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_export_of_a_tp2_pp2_checkpoint_gives_our_logits(text_dataset, tmp_path):
    """4 gloo ranks train 2 iterations (1F1B-flush keeps the head tied across stages);
    the export, loaded by transformers, computes our whole model's logits."""
    prefix, tok = text_dataset
    run = tmp_path / "run"
    r = run_cli([*TORCHRUN, "--nproc_per_node", "4", "pretrain_gpt.py",
                 *tiny_overrides(prefix, tok, run, **{
                     "train.iters": 2, "train.eval_interval": 0, "parallel.tensor": 2,
                     "parallel.pipeline": 2, "pipeline.schedule": "1f1b_flush",
                     "train.precision": "fp32", "model.make_vocab_size_divisible_by": 192})],
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run / "checkpoints" / "iter_0000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["layout"]["tensor"] == 2 and meta["layout"]["pipeline"] == 2

    out = tmp_path / "hf"
    r = run_cli(["-m", "megatron_paci.checkpoint.export_hf", "--checkpoint", str(ckpt),
                 "--output", str(out)])
    assert r.returncode == 0, r.stderr
    assert "the 256 padding rows" in r.stdout  # 512 tokens padded to 768 for tp=2
    assert "sentencepiece" in r.stdout and "not written" in r.stdout
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 512 and hf.config.tie_word_embeddings

    ours, tokenizer, path = load_for_generation(str(run))
    ours.eval()
    assert path == str(ckpt) and tokenizer.vocab_size == 512
    ids = tokenizer.tokenize("Return the number of items in a container. " * 4)[:32]
    tokens = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        expected = ours(tokens=tokens)[..., :512]
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def random_gpt2(directory, vocab=512):
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64,
                                       vocab_size=vocab, bos_token_id=2, eos_token_id=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerNorms off ones and zeros too
    model.save_pretrained(directory)
    return model.eval()


def transformers_loss(model, prefix, seed, iters, global_batch, micro_batch, seq):
    """Mean of transformers' loss over the micro-batches of iteration 1 on one data
    rank, read through the trainer's own dataset and sampler."""
    train, _, _ = build_gpt_datasets([prefix], "969,30,1", seq, seed,
                                     (iters * global_batch, 0, 0), None)
    batches = iter(build_pretraining_data_loader(train, 0, micro_batch, 0, 1))
    losses = []
    with torch.no_grad():
        for _ in range(global_batch // micro_batch):
            text = next(batches)["tokens"]
            out = model(text[:, :-1], labels=text[:, :-1], shift_labels=text[:, 1:].contiguous())
            losses.append(out.loss.item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("ranks", [2])  # one process: the documented-commands test
def test_imported_model_trains_on_and_its_first_loss_is_transformers(text_dataset, tmp_path,
                                                                      ranks):
    """import_hf writes iteration 0; pretrain_gpt.py resumes from it (one process, or
    tp=2 over two gloo ranks) and logs transformers' loss on the same batch."""
    prefix, tok = text_dataset
    model = random_gpt2(tmp_path / "gpt2")
    run = tmp_path / "run"
    extra = ["parallel.tensor=2"] if ranks == 2 else []
    r = run_cli(["-m", "megatron_paci.checkpoint.import_hf", "--model", str(tmp_path / "gpt2"),
                 "--output", str(run), f"data.tokenizer={tok}", "model.dropout=0",
                 "model.attention_dropout=0", *extra])
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "iter_0000000" / "meta.json").is_file()

    overrides = [o for o in tiny_overrides(prefix, tok, run, **{
        "train.iters": 2, "train.eval_interval": 0, "train.precision": "fp32"})
        if not o.startswith("model.")] + ["model.seq_length=32"]
    launch = [*TORCHRUN, "--nproc_per_node", "2"] if ranks == 2 else []
    r = run_cli([*launch, "pretrain_gpt.py", "--config", str(run / "config.yaml"), *overrides],
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "iter_0000000 at iteration 0" in r.stdout
    losses = first_losses(run)
    assert sorted(losses) == [1, 2]
    expected = transformers_loss(model, prefix, seed=1234, iters=2, global_batch=8,
                                 micro_batch=4, seq=32)
    assert abs(losses[1] - expected) < 1e-4, (losses[1], expected)
    assert losses[2] != losses[1]  # it trained
    assert (run / "checkpoints" / "iter_0000002" / "meta.json").is_file()
