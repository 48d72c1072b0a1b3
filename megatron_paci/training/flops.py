"""Model FLOPs per token, the way MFU is usually counted.

Matmul FLOPs only: 2 per multiply-add, forward + backward = 3x forward. Causal
attention is counted as half of full attention, since half the score matrix is
masked. Embedding lookups, norms and softmax are ignored (a few percent).

    per token = 6 * (L * (4 h^2 + 2 h f) + h V)  +  6 * L * s * h

where the first term is the dense weights (qkv + proj = 4h^2, MLP = 2hf, head = hV)
and the second is QK^T and AV over s keys (12 L s h for full attention, halved).
MFU divides the achieved model FLOP/s by the device's dense (no sparsity) bf16 peak.
"""

from __future__ import annotations

from megatron_paci.config.schema import ModelConfig
from megatron_paci.model.transformer import ffn_size


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    h, L, s = cfg.hidden_size, cfg.num_layers, cfg.seq_length
    dense = L * (4 * h * h + 2 * h * ffn_size(cfg)) + h * vocab_size
    return 6.0 * dense + 6.0 * L * s * h


# Dense bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. Matched in
# order against the device name, so the more specific names come first.
DENSE_BF16_PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("H100 80GB HBM3")
    ("A100", 312.0),
)


def dense_bf16_peak_tflops(device_name: str) -> float | None:
    """The data-sheet peak for a device name as torch.cuda.get_device_name gives it."""
    for key, tflops in DENSE_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None
