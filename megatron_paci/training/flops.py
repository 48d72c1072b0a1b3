"""Model FLOPs per token, the way MFU is usually counted.

Matmul FLOPs only: 2 per multiply-add, forward + backward = 3x forward. Causal
attention is counted as half of full attention, since half the score matrix is
masked. Embedding lookups, norms and softmax are ignored (a few percent).

    per token = 6 * (L * (4 h^2 + 2 h f) + h V)  +  6 * L * s * h

where the first term is the dense weights (qkv + proj = 4h^2, MLP = 2hf, head = hV)
and the second is QK^T and AV over s keys (12 L s h for full attention, halved).
MFU divides the achieved model FLOP/s by the device's dense (no sparsity) bf16 peak.

``part_costs`` gives the same per-layer and head terms to the pipeline's cost-balanced
split (``pipeline.layers_per_stage=auto``), plus the small terms the count above leaves
out but a stage still runs: the embedding (position add, and the backward's scatter into
the table) and the loss (softmax cross-entropy, a few element-wise passes over V).
"""

from __future__ import annotations

from megatron_paci.config.schema import ModelConfig
from megatron_paci.model.transformer import ffn_size
from megatron_paci.pipeline.partition import PartCosts

# Element-wise passes per token, forward + backward, of the parts the count above leaves
# out: the loss reads the V logits a few times (max, exp-sum, the gradient softmax -
# onehot), the embedding adds the position row and scatters its gradient back.
LOSS_PASSES = 6
EMBEDDING_PASSES = 3


def layer_flops_per_token(cfg: ModelConfig) -> float:
    """One transformer layer, forward + backward: dense weights and causal attention."""
    h, s = cfg.hidden_size, cfg.seq_length
    return 6.0 * (4 * h * h + 2 * h * ffn_size(cfg)) + 6.0 * s * h


def head_flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """The output layer's matmul, forward + backward."""
    return 6.0 * cfg.hidden_size * vocab_size


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    return cfg.num_layers * layer_flops_per_token(cfg) + head_flops_per_token(cfg, vocab_size)


def part_costs(cfg: ModelConfig, vocab_size: int) -> PartCosts:
    """Per-token cost of a layer, of stage 0's embedding and of the last stage's output
    layer and loss, for the pipeline's balanced split (the final norm, a few passes over
    h, is left out as the layers' norms are)."""
    return PartCosts(layer=layer_flops_per_token(cfg),
                     embedding=EMBEDDING_PASSES * cfg.hidden_size,
                     head=head_flops_per_token(cfg, vocab_size) + LOSS_PASSES * vocab_size)


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
