"""The per-size configs: GPT-3's Table 2.1 and GPT-2's sizes, their parameter counts by a
hand formula, and their default layouts at the world size each file states."""

import math
import re

import pytest

from megatron_paci.config import load_config
from megatron_paci.model.gpt import GPTModel, count_parameters
from megatron_paci.training.layout import validate_layout
from megatron_paci.training.plan import model_parameters

GPT2_VOCAB = 50257

# Brown et al. 2020, Table 2.1: layers, d_model, heads (d_model / d_head), batch in tokens
# (0.5M, 1M, 2M are 2^19, 2^20, 2^21), learning rate; nominal parameter count.
GPT3 = {
    "gpt3_125m": (12, 768, 12, 0.5 * 2**20, 6.0e-4, 125e6),
    "gpt3_350m": (24, 1024, 16, 0.5 * 2**20, 3.0e-4, 350e6),
    "gpt3_760m": (24, 1536, 16, 0.5 * 2**20, 2.5e-4, 760e6),
    "gpt3_1.3b": (24, 2048, 16, 2**20, 2.0e-4, 1.3e9),  # Table: 24 heads x 128 (a typo)
    "gpt3_2.7b": (32, 2560, 32, 2**20, 1.6e-4, 2.7e9),
    "gpt3_6.7b": (32, 4096, 32, 2 * 2**20, 1.2e-4, 6.7e9),
    "gpt3_13b": (40, 5120, 40, 2 * 2**20, 1.0e-4, 13e9),  # Table: d_model 5140 (a typo)
    "gpt3_175b": (96, 12288, 96, 3.2 * 2**20, 0.6e-4, 175e9),
}
# Radford et al. 2019 sizes: layers, d_model, heads; nominal parameter count.
GPT2 = {
    "gpt2_small": (12, 768, 12, 124e6),
    "gpt2_medium": (24, 1024, 16, 355e6),
    "gpt2_large": (36, 1280, 20, 774e6),
    "gpt2_xl": (48, 1600, 25, 1558e6),
}
NOMINAL = {**{k: v[-1] for k, v in GPT3.items()}, **{k: v[-1] for k, v in GPT2.items()},
           # GPT-2 Medium with its own output layer (PACI's recipe unties it).
           "paci_gpt2_medium": 355e6 + GPT2_VOCAB * 1024}


def path(name: str) -> str:
    return f"configs/{name}.yaml"


def hand_count(L: int, h: int, V: int, S: int, tied: bool = True) -> int:
    """12·L·h² + 13·L·h + (V + S)·h + 2h, plus V·h for an untied output layer."""
    return 12 * L * h * h + 13 * L * h + (V + S) * h + 2 * h + (0 if tied else V * h)


def stated_world_size(name: str) -> int:
    with open(path(name)) as f:
        found = re.search(r"# Assumed world size: (\d+) GPUs", f.read())
    assert found, f"{path(name)} states no world size"
    return int(found.group(1))


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_parameter_count_within_5_percent_of_nominal(name):
    m = load_config(path(name)).model
    assert m.vocab_size == GPT2_VOCAB and (m.ffn_hidden_size or 4 * m.hidden_size) == \
        4 * m.hidden_size and m.position_embedding == "learned"
    n = hand_count(m.num_layers, m.hidden_size, GPT2_VOCAB, m.seq_length, m.tie_embeddings)
    assert abs(n / NOMINAL[name] - 1) < 0.05, (name, n)
    assert model_parameters(m, GPT2_VOCAB) == n


@pytest.mark.parametrize("tied", [True, False])
def test_hand_formula_counts_the_real_model(tied):
    cfg = load_config(None, ["model.num_layers=3", "model.hidden_size=48",
                             "model.num_attention_heads=4", "model.seq_length=40",
                             f"model.tie_embeddings={tied}"]).model
    model = GPTModel(cfg, 200)
    assert count_parameters(model) == hand_count(3, 48, 200, 40, tied)
    assert model_parameters(cfg, 200) == count_parameters(model)


@pytest.mark.parametrize("name", sorted(GPT3))
def test_gpt3_configs_follow_table_2_1(name):
    L, h, heads, batch_tokens, lr, _ = GPT3[name]
    cfg = load_config(path(name))
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == \
        (L, h, heads, 2048)
    assert o.lr == pytest.approx(lr) and o.min_lr == pytest.approx(0.1 * lr)
    # The batch in sequences of 2048; 175B's 3.2M tokens is rounded to Megatron's 1536.
    assert t.global_batch_size == (1536 if name == "gpt3_175b" else batch_tokens / 2048)
    tokens = t.global_batch_size * 2048
    assert t.iters == math.ceil(300e9 / tokens)
    assert o.lr_warmup_iters == round(375e6 / tokens)
    assert o.lr_decay_iters == round(260e9 / tokens)
    assert (o.adam_beta1, o.adam_beta2, o.weight_decay, o.clip_grad) == (0.9, 0.95, 0.1, 1.0)


@pytest.mark.parametrize("name", sorted(GPT2))
def test_gpt2_configs(name):
    L, h, heads, _ = GPT2[name]
    cfg = load_config(path(name))
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == \
        (L, h, heads, 1024)
    assert m.tie_embeddings and t.global_batch_size == 512 and t.iters == 300000


def test_paci_recipe():
    cfg = load_config(path("paci_gpt2_medium"))
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (24, 1024, 16)
    assert cfg.parallel.pipeline == 8 and cfg.pipeline.schedule == "paci"
    dp = validate_layout(cfg, stated_world_size("paci_gpt2_medium"))
    assert t.global_batch_size // (t.micro_batch_size * dp) == 8  # window a = 8
    assert (t.global_batch_size, t.micro_batch_size) == (256, 32)
    assert o.lr == pytest.approx(3e-4 * math.sqrt(t.global_batch_size / 256))
    assert o.min_lr == pytest.approx(0.1 * o.lr) and o.lr_decay_style == "cosine"
    assert t.iters == math.ceil(50e9 / (256 * 1024))
    assert o.lr_warmup_iters == round(0.01 * t.iters)
    assert o.lr_decay_iters is None  # decays over train.iters
    assert (o.weight_decay, o.adam_beta1, o.adam_beta2, o.clip_grad) == (0.1, 0.9, 0.95, 0.0)
    assert not m.tie_embeddings and m.dropout == 0.1 and t.precision in ("bf16", "auto")


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_default_layout_valid_at_stated_world_size(name):
    cfg = load_config(path(name))
    world = stated_world_size(name)
    dp = validate_layout(cfg, world)
    assert dp * cfg.parallel.tensor * cfg.parallel.pipeline == world
    assert "gpt2-bpe:" in cfg.data.tokenizer and cfg.data.path


def test_layouts_use_whole_8_gpu_nodes_and_keep_tp_inside_one():
    for name in NOMINAL:
        cfg = load_config(path(name))
        assert stated_world_size(name) % 8 == 0 and 8 % cfg.parallel.tensor == 0, name


def test_hand_formula_counts_gpt2_small_built_for_real():
    cfg = load_config(path("gpt2_small")).model
    real = count_parameters(GPTModel(cfg, GPT2_VOCAB))
    assert real == hand_count(12, 768, GPT2_VOCAB, 1024)
