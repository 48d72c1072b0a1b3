"""Hugging Face GPT-2 export and import, checked against transformers' own GPT2LMHeadModel."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from megatron_paci.checkpoint import export_hf, import_hf  # noqa: E402
from megatron_paci.checkpoint.format import load_checkpoint, save_checkpoint  # noqa: E402
from megatron_paci.checkpoint.hf import UnsupportedFeature, to_hf_state  # noqa: E402
from megatron_paci.config.loader import to_yaml  # noqa: E402
from megatron_paci.config.schema import Config  # noqa: E402
from megatron_paci.data.tokenizer import build_tokenizer  # noqa: E402
from megatron_paci.model.gpt import GPTModel  # noqa: E402
from megatron_paci.training.generate import load_for_generation  # noqa: E402

TEXT = ("the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
        "pipelines overlap forward and backward passes; tensors split over ranks. ") * 20


def hf_model(tied=True, vocab=320, n_inner=None, seed=0):
    """A random GPT-2 whose every tensor (LayerNorms included) is non-trivial."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=16,
                     n_inner=n_inner, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def bpe_tokenizer(directory, vocab_size=300):
    """A small GPT-2 byte-level BPE (vocab.json + merges.txt) trained on TEXT."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([TEXT], vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    os.makedirs(directory, exist_ok=True)
    tok.save_model(str(directory))


def write_checkpoint(run_dir, cfg, model):
    """A one-process checkpoint of ``model`` in this project's format."""
    meta = {"consumed_samples": 0, "lr_schedule": {"num_steps": 0},
            "schedule": cfg.pipeline.schedule,
            "layout": {"world": 1, "tensor": 1, "pipeline": 1, "data": 1}}
    return save_checkpoint(os.path.join(run_dir, "checkpoints"), 3,
                           {"model": model.state_dict()}, meta, to_yaml(cfg))


def our_model(tied, **model):
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 3, 48, 4
    cfg.model.seq_length, cfg.model.ffn_hidden_size = 16, 80
    cfg.model.tie_embeddings = tied
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.data.tokenizer = "null:100"
    torch.manual_seed(1)
    net = GPTModel(cfg.model, 128, seed=7)  # vocabulary 100 padded to 128
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "ln" in name or "norm" in name or name.endswith("bias"):
                p.normal_(0.5, 0.3)  # init leaves these at ones and zeros
    return cfg, net.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_export_logits_equal_ours_and_padding_is_cut(tmp_path, tied, capsys):
    cfg, net = our_model(tied)
    path = write_checkpoint(tmp_path / "run", cfg, net)
    out = tmp_path / "hf"
    assert export_hf.main(["--checkpoint", path, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the 28 padding rows" in printed and "null tokenizer" in printed
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 100 and hf.config.tie_word_embeddings == tied
    assert hf.config.n_inner == 80 and hf.config.n_positions == 16
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = net(tokens=tokens)[..., :100]
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tied,n_inner", [(True, None), (False, 48)])
def test_hf_round_trip_is_bit_identical(tmp_path, tied, n_inner):
    src = tmp_path / "src"
    original = hf_model(tied=tied, n_inner=n_inner)
    original.save_pretrained(src)
    bpe_tokenizer(src)
    run, out = tmp_path / "run", tmp_path / "out"
    assert import_hf.main(["--model", str(src), "--output", str(run)]) == 0
    assert export_hf.main(["--checkpoint", str(run), "--output", str(out)]) == 0
    back = GPT2LMHeadModel.from_pretrained(out)
    a, b = original.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for key in ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size",
                "tie_word_embeddings", "layer_norm_epsilon", "resid_pdrop", "attn_pdrop"):
        assert getattr(back.config, key) == getattr(original.config, key), key
    # The tokenizer went through both ways and encodes as ours does.
    ours = build_tokenizer(str(src))
    theirs = AutoTokenizer.from_pretrained(out)
    text = "the lazy fox overlaps passes over ranks"
    assert theirs.encode(text) == ours.tokenize(text)
    assert theirs.eos_token == "<|endoftext|>"


def test_import_pads_vocabulary_with_zero_rows_and_keeps_logits(tmp_path):
    src = tmp_path / "src"
    original = hf_model(vocab=100)
    original.save_pretrained(src)
    run = tmp_path / "run"
    assert import_hf.main(["--model", str(src), "--output", str(run), "data.tokenizer=null:100",
                           "model.make_vocab_size_divisible_by=64"]) == 0
    net, _, _ = load_for_generation(str(run))
    net.eval()
    emb = net.embedding.word_embeddings.weight
    assert emb.shape[0] == 128 and torch.count_nonzero(emb[100:]) == 0
    assert torch.equal(emb[:100], original.transformer.wte.weight)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(tokens=tokens)[..., :100], original(tokens).logits,
                                   rtol=0, atol=1e-4)


def test_imported_checkpoint_holds_what_a_resume_loads(tmp_path):
    """Zero AdamW moments at step 0, the seeded RNG of each rank, a head copy for a
    pipeline's last stage, iteration 0."""
    src = tmp_path / "src"
    original = hf_model()
    original.save_pretrained(src)
    run = tmp_path / "run"
    assert import_hf.main(["--model", str(src), "--output", str(run), "data.tokenizer=null:320",
                           "parallel.tensor=2", "--world-size", "4"]) == 0
    path = run / "checkpoints" / "iter_0000000"
    wte = original.transformer.wte.weight
    target = {
        "model": {"output_layer.weight": torch.empty_like(wte)},
        "optimizer": {"layers.1.mlp.fc2.weight.exp_avg_sq": torch.ones(32, 128),
                      "layers.1.mlp.fc2.weight.step": torch.ones(())},
        **{f"rng_rank{r}": {"tracker.tensor-parallel-rng/cpu": torch.empty(5056,
                                                                          dtype=torch.uint8)}
           for r in range(4)},
    }
    meta = load_checkpoint(str(path), target)
    assert meta["iteration"] == 0 and meta["consumed_samples"] == 0
    assert torch.equal(target["model"]["output_layer.weight"], wte)
    assert not target["optimizer"]["layers.1.mlp.fc2.weight.exp_avg_sq"].any()
    assert target["optimizer"]["layers.1.mlp.fc2.weight.step"].item() == 0
    # tp ranks draw different dropout streams: rank 0 and 1 differ, rank 2 (dp 1) = rank 0.
    states = [target[f"rng_rank{r}"]["tracker.tensor-parallel-rng/cpu"] for r in range(4)]
    expected = torch.Generator().manual_seed(1234 + 2718 + 1).get_state()
    assert torch.equal(states[1], expected)
    assert not torch.equal(states[0], states[1]) and torch.equal(states[0], states[2])
    text = (run / "config.yaml").read_text()
    assert "num_layers: 2" in text and f"dir: {run}" in text and "vocab_size: 320" in text


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_rotary_model_is_refused_naming_the_feature(tmp_path, capsys):
    cfg, net = our_model(True, position_embedding="rope")
    path = write_checkpoint(tmp_path / "run", cfg, net)
    out = tmp_path / "hf"
    capsys.readouterr()
    assert export_hf.main(["--checkpoint", path, "--output", str(out)]) == 2
    line = one_error_line(capsys)
    assert "model.position_embedding=rope" in line and "rotary" in line
    assert not out.exists()


def test_norm_without_bias_is_refused_naming_the_feature():
    cfg, net = our_model(True)
    state = {k: v for k, v in net.state_dict().items() if k != "layers.0.ln1.bias"}
    with pytest.raises(UnsupportedFeature, match=r"no layers\.0\.ln1\.bias.*RMSNorm"):
        to_hf_state(state, cfg.model, 100)
    state = dict(net.state_dict(), **{"layers.0.mlp.gate.weight": torch.zeros(80, 48)})
    with pytest.raises(UnsupportedFeature, match=r"layers\.0\.mlp\.gate\.weight has no "):
        to_hf_state(state, cfg.model, 100)


@pytest.mark.parametrize("change,args,needle", [
    ({"activation_function": "relu"}, [], "activation_function='relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, [], "scale_attn_by_inverse_layer_idx"),
    ({"model_type": "llama"}, [], "model_type='llama'"),
    ({}, ["model.num_layers=3"], "model.num_layers=3 on the command line contradicts"),
])
def test_import_refusals_are_one_line_and_write_nothing(tmp_path, capsys, change, args,
                                                        needle):
    src = tmp_path / "src"
    hf_model().save_pretrained(src)
    with open(src / "config.json") as f:
        config = json.load(f)
    config.update(change)
    with open(src / "config.json", "w") as f:
        json.dump(config, f)
    run = tmp_path / "run"
    capsys.readouterr()
    assert import_hf.main(["--model", str(src), "--output", str(run), *args]) == 2
    assert needle in one_error_line(capsys)
    assert not run.exists()


def test_import_refuses_missing_weights_and_a_too_large_tokenizer(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    hf_model(vocab=200).save_pretrained(src)
    bpe_tokenizer(src, vocab_size=260)  # more tokens than the model's 200
    run = tmp_path / "run"
    capsys.readouterr()
    assert import_hf.main(["--model", str(src), "--output", str(run)]) == 2
    assert "has 260 tokens, more than the model's vocab_size 200" in one_error_line(capsys)
    weights = load_file(src / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.bias"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    assert import_hf.main(["--model", str(src), "--output", str(run),
                           "data.tokenizer=null:200"]) == 2
    assert "have no transformer.h.1.mlp.c_fc.bias" in one_error_line(capsys)
    assert not run.exists()


def test_import_reads_pytorch_bin_weights(tmp_path):
    src = tmp_path / "src"
    original = hf_model()
    original.save_pretrained(src)
    from safetensors.torch import load_file

    weights = load_file(src / "model.safetensors")
    os.remove(src / "model.safetensors")
    torch.save(weights, src / "pytorch_model.bin")
    run = tmp_path / "run"
    assert import_hf.main(["--model", str(src), "--output", str(run),
                           "data.tokenizer=null:320"]) == 0
    net, _, _ = load_for_generation(str(run))
    fc2 = original.transformer.h[1].mlp.c_proj.weight  # Conv1D: [in, out]
    assert torch.equal(net.layers["1"].mlp.fc2.weight, fc2.t())
