"""The Hugging Face GPT-2 form of this project's model: names, layouts and config, both ways.

Pure tensor and dict conversion (no files, no transformers import), shared by
``export_hf`` and ``import_hf``. What differs between the two forms:

- names: ``layers.7.attn.qkv.weight`` here is ``transformer.h.7.attn.c_attn.weight`` there;
- GPT-2's linears are ``Conv1D``: weights stored transposed, ``[in, out]``;
- the fused qkv rows are ``[heads, (q, k, v), head_dim]`` here (a tensor-parallel shard then
  holds whole heads) and ``[(q, k, v), heads, head_dim]`` in ``c_attn``;
- the word embedding here is padded to Megatron's vocabulary multiple; GPT-2's is not.

Everything else (pre-LayerNorm blocks with biases, learned absolute positions, GeLU with
the tanh approximation, 1/sqrt(head_dim) attention scaling, a head tied to the embedding
or a bias-free untied one) is the same computation.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_paci.config.schema import ModelConfig

# GPT-2 activations that compute GeLU with the tanh approximation, which the MLP here uses.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
EXPORT_ACTIVATION = "gelu_new"  # GPT-2's own name for it

# Per layer: our name -> (GPT-2 name, how the tensor is stored there).
_LAYER_MAP = {
    "ln1.weight": ("ln_1.weight", "same"),
    "ln1.bias": ("ln_1.bias", "same"),
    "attn.qkv.weight": ("attn.c_attn.weight", "qkv_weight"),
    "attn.qkv.bias": ("attn.c_attn.bias", "qkv_bias"),
    "attn.proj.weight": ("attn.c_proj.weight", "conv1d"),
    "attn.proj.bias": ("attn.c_proj.bias", "same"),
    "ln2.weight": ("ln_2.weight", "same"),
    "ln2.bias": ("ln_2.bias", "same"),
    "mlp.fc1.weight": ("mlp.c_fc.weight", "conv1d"),
    "mlp.fc1.bias": ("mlp.c_fc.bias", "same"),
    "mlp.fc2.weight": ("mlp.c_proj.weight", "conv1d"),
    "mlp.fc2.bias": ("mlp.c_proj.bias", "same"),
}
_TOP_MAP = {
    "embedding.word_embeddings.weight": "transformer.wte.weight",
    "embedding.position_embeddings.weight": "transformer.wpe.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
    "output_layer.weight": "lm_head.weight",
}


class UnsupportedFeature(ValueError):
    """The model uses something the other form cannot hold; the message names it."""


def name_map(num_layers: int, tied: bool) -> dict[str, tuple[str, str]]:
    """Our parameter name -> (GPT-2 name, storage kind) for a whole model."""
    out = {k: (v, "same") for k, v in _TOP_MAP.items() if not (tied and k == "output_layer.weight")}
    for i in range(num_layers):
        for ours, (theirs, kind) in _LAYER_MAP.items():
            out[f"layers.{i}.{ours}"] = (f"transformer.h.{i}.{theirs}", kind)
    return out


def _qkv_rows_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[heads, 3, d, ...]`` rows -> ``[3, heads, d, ...]`` rows."""
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def _qkv_rows_from_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def _to_hf(t: torch.Tensor, kind: str, heads: int) -> torch.Tensor:
    if kind == "qkv_weight":
        return _qkv_rows_to_hf(t, heads).t()
    if kind == "qkv_bias":
        return _qkv_rows_to_hf(t, heads)
    if kind == "conv1d":
        return t.t()
    return t


def _from_hf(t: torch.Tensor, kind: str, heads: int) -> torch.Tensor:
    if kind == "qkv_weight":
        return _qkv_rows_from_hf(t.t(), heads)
    if kind == "qkv_bias":
        return _qkv_rows_from_hf(t, heads)
    if kind == "conv1d":
        return t.t()
    return t


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, naming the feature, a model config GPT-2 cannot express."""
    if cfg.position_embedding != "learned":
        raise UnsupportedFeature(
            f"model.position_embedding={cfg.position_embedding}: rotary position embeddings "
            "have no GPT-2 form (GPT-2 learns absolute position embeddings, transformer.wpe)")


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig,
                vocab_size: int) -> dict[str, torch.Tensor]:
    """A whole model's state dict in GPT-2 names and layouts, the vocabulary cut to
    ``vocab_size`` rows (the padding rows are dropped). A tied model gets ``lm_head.weight``
    as the embedding itself, as ``GPT2LMHeadModel.state_dict()`` lists it."""
    check_exportable(cfg)
    tied = "output_layer.weight" not in state
    names = name_map(cfg.num_layers, tied)
    missing = [n for n in names if n not in state]
    if missing:
        raise UnsupportedFeature(
            f"the model has no {missing[0]}"
            f"{' (and ' + str(len(missing) - 1) + ' more)' if len(missing) > 1 else ''}: "
            f"{_role(missing[0])}")
    extra = [n for n in state if n not in names]
    if extra:
        raise UnsupportedFeature(
            f"parameter {extra[0]} has no counterpart in GPT-2 (GPT2LMHeadModel holds "
            "LayerNorm weight and bias, fused qkv, proj, fc1, fc2 with biases, learned "
            "positions and a bias-free head)")
    padded = state["embedding.word_embeddings.weight"].shape[0]
    if vocab_size > padded:
        raise ValueError(f"vocabulary {vocab_size} is larger than the model's {padded} rows")
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, kind) in names.items():
        t = state[ours].detach()
        if ours in ("embedding.word_embeddings.weight", "output_layer.weight"):
            t = t[:vocab_size]
        out[theirs] = _to_hf(t, kind, cfg.num_attention_heads).contiguous()
    if tied:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _role(name: str) -> str:
    if name.endswith("ln1.bias") or name.endswith("ln2.bias") or name == "final_norm.bias":
        return "GPT-2 needs LayerNorm with a bias (a norm without one, such as RMSNorm, " \
               "has no GPT-2 form)"
    if name.endswith(".bias"):
        return "GPT-2's linears all have biases"
    if "position_embeddings" in name:
        return "GPT-2 needs learned absolute position embeddings"
    return "GPT-2 needs it"


def hf_config_kwargs(cfg: ModelConfig, vocab_size: int, tied: bool,
                     eod: int | None) -> dict[str, Any]:
    """``GPT2Config`` arguments for the model ``cfg`` describes (``vocab_size`` unpadded)."""
    check_exportable(cfg)
    special = eod if eod is not None and 0 <= eod < vocab_size else None
    return {
        "vocab_size": vocab_size,
        "n_positions": cfg.max_position_embeddings or cfg.seq_length,
        "n_embd": cfg.hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_attention_heads,
        "n_inner": cfg.ffn_hidden_size,  # None means 4 x n_embd in both
        "activation_function": EXPORT_ACTIVATION,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attention_dropout,
        "layer_norm_epsilon": cfg.layernorm_epsilon,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "tie_word_embeddings": tied,
        "bos_token_id": special,
        "eos_token_id": special,
        "architectures": ["GPT2LMHeadModel"],
    }


def model_section_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """``model.*`` values for a GPT-2 ``config.json``; refuses what the model here lacks."""
    where = "config.json"
    if hf.get("model_type") != "gpt2":
        raise UnsupportedFeature(f"{where}: model_type={hf.get('model_type')!r}; only GPT-2 "
                                 "models (model_type 'gpt2') are read")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise UnsupportedFeature(
            f"{where}: activation_function={act!r}; the MLP here is GeLU with the tanh "
            f"approximation ({', '.join(TANH_GELUS)})")
    if not hf.get("scale_attn_weights", True):
        raise UnsupportedFeature(f"{where}: scale_attn_weights=false; attention here always "
                                 "scales by 1/sqrt(head_dim)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedFeature(f"{where}: scale_attn_by_inverse_layer_idx=true; attention "
                                 "here does not scale by the layer index")
    if hf.get("add_cross_attention", False):
        raise UnsupportedFeature(f"{where}: add_cross_attention=true; the model here is "
                                 "decoder-only, without cross-attention")
    n_embd, n_head = int(hf["n_embd"]), int(hf["n_head"])
    n_inner = hf.get("n_inner")
    return {
        "num_layers": int(hf["n_layer"]),
        "hidden_size": n_embd,
        "num_attention_heads": n_head,
        "ffn_hidden_size": None if n_inner in (None, 4 * n_embd) else int(n_inner),
        "seq_length": int(hf["n_positions"]),
        "max_position_embeddings": int(hf["n_positions"]),
        "vocab_size": int(hf["vocab_size"]),
        # No padding by default: the imported model computes exactly what GPT-2 does.
        "make_vocab_size_divisible_by": 1,
        "position_embedding": "learned",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "dropout": float(hf.get("resid_pdrop", 0.1)),
        "attention_dropout": float(hf.get("attn_pdrop", 0.1)),
        "layernorm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def from_hf_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig,
                  padded_vocab: int) -> dict[str, torch.Tensor]:
    """GPT-2 tensors in our names and layouts. The embedding (and an untied head) gets
    zero rows up to ``padded_vocab``. A tied model also gets ``output_layer.weight``, a
    copy of the embedding: a pipeline's last stage holds one, so every layout resumes."""
    tied = cfg.tie_embeddings
    names = name_map(cfg.num_layers, tied)
    missing = [theirs for theirs, _ in names.values() if theirs not in hf_state]
    if missing:
        raise ValueError(f"the GPT-2 weights have no {missing[0]}")
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, kind) in names.items():
        t = _from_hf(hf_state[theirs].detach().float(), kind, cfg.num_attention_heads)
        if ours in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if t.shape[0] > padded_vocab:
                raise ValueError(f"{theirs} has {t.shape[0]} rows, more than the padded "
                                 f"vocabulary {padded_vocab}")
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])])
        out[ours] = t.contiguous().clone()
    if tied:
        out["output_layer.weight"] = out["embedding.word_embeddings.weight"].clone()
    return out
