"""A tiny GPT trained with every op on its Triton kernel follows the torch-reference
run, and the start-up table and parity check run. On the CPU (default) the kernels go
through Triton's interpreter; with MEGATRON_PACI_TEST_DEVICE=cuda both runs train on the
GPU with compiled kernels."""

import json
import os

import numpy as np
import pytest

from megatron_paci.config import load_config
from megatron_paci.data.indexed_dataset import IndexedDatasetBuilder

pytest.importorskip("triton")


def _dataset(directory) -> str:
    prefix = os.path.join(directory, "tokens")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(32):
        builder.add_document(rng.integers(0, 95, size=int(rng.integers(20, 60))))
    builder.finalize(prefix + ".idx")
    return prefix


def _train(prefix, run_dir, backend, device, capsys):
    from megatron_paci.training.trainer import Trainer

    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
        "model.seq_length=16", "model.dropout=0.0", "model.attention_dropout=0.0",
        "model.position_embedding=rope", "model.make_vocab_size_divisible_by=32",
        f"data.path=[{prefix}]", "data.tokenizer=null:96", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.iters=3", "train.eval_interval=0",
        "train.precision=fp32", "logging.interval=1", "logging.plot=false",
        "checkpoint.save_at_end=false", f"kernels.backend={backend}", f"train.device={device}",
        f"run.dir={run_dir}"])
    Trainer(cfg).train()
    out = capsys.readouterr().out
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r], out


def test_triton_kernels_train_like_the_references(tmp_path, capsys, monkeypatch,
                                                  kernel_device):
    if kernel_device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        why = "CPU through TRITON_INTERPRET=1"
    else:
        why = "CUDA device"
    device = kernel_device.type
    prefix = _dataset(str(tmp_path))
    ref, _ = _train(prefix, str(tmp_path / "torch"), "torch", device, capsys)
    got, out = _train(prefix, str(tmp_path / "triton"), "triton", device, capsys)
    assert "kernel parity check against the torch references passed" in out
    assert f"  cross_entropy     triton   kernels.backend: {why}" in out
    # On CUDA this line says whether SDPA's flash backend takes the model's q/k/v.
    line = next(x for x in out.splitlines() if x.startswith("attention: "))
    if kernel_device.type == "cuda":
        assert "flash backend (torch.float32" not in line  # fp32 runs are never flash
    else:
        assert line == ("attention: F.scaled_dot_product_attention on cpu "
                        "(flash backend checked on CUDA only)")
    np.testing.assert_allclose(got, ref, rtol=1e-5)
