import math

import pytest
import torch
import torch.nn.functional as F

from megatron_paci.config.schema import ModelConfig
from megatron_paci.model.gpt import GPTModel, StageSpec, padded_vocab_size


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_shapes_and_loss_matches_torch_cross_entropy(pos):
    torch.manual_seed(0)
    model = GPTModel(tiny(position_embedding=pos), vocab_size=128)
    tokens = torch.randint(0, 128, (3, 16))
    logits = model(tokens=tokens)
    assert logits.shape == (3, 16, 128)
    labels = torch.randint(0, 128, (3, 16))
    loss = model(tokens=tokens, labels=labels)
    assert loss.shape == (3, 16)
    ref = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), ref)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_causal_masking(pos):
    model = GPTModel(tiny(position_embedding=pos), vocab_size=64).eval()
    a = torch.randint(0, 64, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 64  # change only the future of position 9
    la, lb = model(tokens=a), model(tokens=b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_megatron_init():
    cfg = tiny(num_layers=8, hidden_size=128, num_attention_heads=4)
    model = GPTModel(cfg, vocab_size=1024)
    params = dict(model.named_parameters())
    emb = params["embedding.word_embeddings.weight"]
    assert abs(emb.std().item() - 0.02) < 0.001
    qkv = params["layers.3.attn.qkv.weight"]
    assert abs(qkv.std().item() - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * 8)
    for name in ("layers.3.attn.proj.weight", "layers.5.mlp.fc2.weight"):
        assert abs(params[name].std().item() - scaled) < 0.1 * scaled
    assert torch.all(params["layers.0.attn.qkv.bias"] == 0)
    assert torch.all(params["layers.0.ln1.weight"] == 1)
    assert torch.all(params["final_norm.bias"] == 0)


def test_tied_and_untied_head():
    tied = GPTModel(tiny(), vocab_size=64)
    assert tied.output_layer is None
    assert tied.head_weight() is tied.embedding.word_embeddings.weight
    untied = GPTModel(tiny(tie_embeddings=False), vocab_size=64)
    assert untied.output_layer is not None
    assert untied.head_weight() is not untied.embedding.word_embeddings.weight


def test_stages_compose_to_the_whole_model():
    """Two stages built by layer range hold the same weights and compute the same loss."""
    cfg = tiny(num_layers=4, tie_embeddings=False)
    whole = GPTModel(cfg, vocab_size=64, seed=7)
    first = GPTModel(cfg, vocab_size=64, stage=StageSpec(0, 2, True, False), seed=7)
    last = GPTModel(cfg, vocab_size=64, stage=StageSpec(2, 4, False, True), seed=7)
    whole_params = dict(whole.named_parameters())
    for stage in (first, last):
        for name, p in stage.named_parameters():
            assert torch.equal(p, whole_params[name]), name
    assert set(whole_params) == {n for s in (first, last) for n, _ in s.named_parameters()}
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))
    hidden = first(tokens=tokens)
    assert hidden.shape == (16, 2, 32)  # [seq, batch, hidden]
    torch.testing.assert_close(last(hidden=hidden, labels=labels),
                               whole(tokens=tokens, labels=labels))


def test_tied_head_on_last_stage_starts_equal_to_embedding():
    cfg = tiny(num_layers=2)
    first = GPTModel(cfg, vocab_size=64, stage=StageSpec(0, 1, True, False), seed=3)
    last = GPTModel(cfg, vocab_size=64, stage=StageSpec(1, 2, False, True), seed=3)
    assert torch.equal(last.output_layer.weight, first.embedding.word_embeddings.weight)


def test_same_seed_same_weights_other_seed_differs():
    a = GPTModel(tiny(), 64, seed=1).state_dict()
    b = GPTModel(tiny(), 64, seed=1).state_dict()
    c = GPTModel(tiny(), 64, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.attn.qkv.weight"], c["layers.0.attn.qkv.weight"])


def test_padded_vocab():
    assert padded_vocab_size(50257, 128) == 50304
    assert padded_vocab_size(50257, 128, tensor_parallel=2) == 50432
    assert padded_vocab_size(256, 128) == 256


def test_gradients_reach_every_parameter():
    model = GPTModel(tiny(), vocab_size=64)
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens=tokens, labels=tokens).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
