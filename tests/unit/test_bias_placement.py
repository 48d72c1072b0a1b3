"""With the torch reference kernels every linear layer's bias is added inside its GEMM
(addmm), not as a pass of its own before GeLU or the residual: counted at the aten level,
a layer's forward runs four addmm, no plain mm, and only the two residual adds; and the
layer computes what an independent pre-LN block written with torch.nn.functional does."""

from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_paci.config.schema import ModelConfig
from megatron_paci.model.transformer import LayerContext, TransformerLayer

CFG = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=8,
                  dropout=0.0, attention_dropout=0.0)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _layer() -> TransformerLayer:
    torch.manual_seed(0)
    layer = TransformerLayer(CFG, LayerContext())
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)  # biases too: a dropped bias would show
    return layer


def test_reference_kernels_add_each_bias_in_its_gemm():
    layer, x = _layer(), torch.randn(8, 2, 32)
    with torch.no_grad(), _CountOps() as counted:
        layer(x)
    assert counted.ops["addmm"] == 4 and counted.ops["mm"] == 0, counted.ops
    assert counted.ops["add"] == 2, counted.ops  # the two residuals, nothing else


def test_the_layer_is_a_pre_ln_block():
    layer, x = _layer(), torch.randn(8, 2, 32)
    a, m = layer.attn, layer.mlp
    h = F.layer_norm(x, (32,), layer.ln1.weight, layer.ln1.bias, 1e-5)
    q, k, v = (h @ a.qkv.weight.T + a.qkv.bias).view(8, 2, 2, 3, 16).permute(3, 1, 2, 0, 4)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x1 = x + att.permute(2, 0, 1, 3).reshape(8, 2, 32) @ a.proj.weight.T + a.proj.bias
    h = F.layer_norm(x1, (32,), layer.ln2.weight, layer.ln2.bias, 1e-5)
    h = F.gelu(h @ m.fc1.weight.T + m.fc1.bias, approximate="tanh")
    want = x1 + h @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
