"""FLOPs per token and MFU against hand-computed numbers."""

import dataclasses

from megatron_paci.config import load_config
from megatron_paci.training.flops import dense_bf16_peak_tflops, flops_per_token
from megatron_paci.training.metrics import format_log_line


def test_gpt2_medium_flops_per_token_by_hand():
    cfg = load_config("configs/gpt2_medium.yaml").model
    # L=24, h=1024, f=4h, padded V=50304, s=1024:
    # 6 * (24 * (4 * 1024^2 + 2 * 1024 * 4096) + 1024 * 50304) + 6 * 24 * 1024 * 1024
    assert flops_per_token(cfg, 50304) == 2_121_007_104 + 150_994_944
    longer = dataclasses.replace(cfg, seq_length=2048)  # attention grows with s, weights not
    assert flops_per_token(longer, 50304) - flops_per_token(cfg, 50304) == 150_994_944


def test_dense_peaks_by_device_name():
    assert dense_bf16_peak_tflops("NVIDIA H200") == 989.0
    assert dense_bf16_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert dense_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert dense_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert dense_bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_bf16_peak_tflops("cpu") is None


def test_log_line_shows_mfu_only_when_known():
    row = {"iteration": 3, "consumed_samples": 96, "ms_per_iter": 250.0,
           "tokens_per_s": 1.0e5, "tflops": 445.05, "lr": 3e-4, "global_batch_size": 32,
           "loss": 5.5, "grad_norm": 1.25, "skipped_iters": 0}
    assert "MFU" not in format_log_line(row, 10)
    assert "MFU" not in format_log_line(row, 10, verbose=True)
    row["mfu"] = 445.05 / 989.0
    assert format_log_line(row, 10).endswith("| tokens/s: 100000 | MFU: 45.0% |")
    assert "| TFLOP/s/GPU: 445.050 | MFU: 45.0% |" in format_log_line(row, 10, verbose=True)
