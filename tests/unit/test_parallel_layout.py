import pytest

from megatron_paci.config import load_config
from megatron_paci.parallel.state import (
    ParallelConfigError,
    global_rank,
    rank_coordinates,
    world_from_env,
)
from megatron_paci.training.layout import validate_layout


def test_world_from_torchrun_and_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert world_from_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert world_from_env() == (3, 4, 3)  # torchrun wins over slurm


def test_rank_coordinates_round_trip():
    for r in range(16):
        tp, dp, pp = rank_coordinates(r, tensor=2, data=4)
        assert global_rank(tp, dp, pp, 2, 4) == r
    assert rank_coordinates(5, tensor=2, data=2) == (1, 0, 1)


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.tensor=3"], 4, "world size 4 is not divisible by parallel.tensor=3"),
    (["parallel.tensor=8", "model.num_attention_heads=4", "model.hidden_size=64"], 8,
     "larger than model.num_attention_heads=4"),
    (["model.ffn_hidden_size=30", "parallel.tensor=4", "model.num_attention_heads=4",
      "model.hidden_size=64"], 4, "FFN size 30"),
    (["parallel.sequence_parallel=true"], 1, "needs parallel.tensor > 1"),
    (["train.global_batch_size=6", "train.micro_batch_size=2"], 2,
     "train.global_batch_size=6 is not divisible by train.micro_batch_size=2 x data-parallel"),
])
def test_layout_errors_name_the_sizes(overrides, world, needle):
    with pytest.raises(ParallelConfigError, match=needle.replace("+", r"\+")):
        validate_layout(load_config(None, overrides), world)


def test_data_parallel_size():
    cfg = load_config(None, ["parallel.tensor=2", "train.global_batch_size=32",
                             "train.micro_batch_size=4"])
    assert validate_layout(cfg, 8) == 4


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.pipeline=5", "model.num_layers=4"], 5,
     "parallel.pipeline=5 is larger than model.num_layers=4"),
    (["parallel.pipeline=2", "model.num_layers=4", "pipeline.layers_per_stage=[1,2]"], 2,
     "pipeline.layers_per_stage=[1, 2] covers 3 layers, model.num_layers=4"),
    (["parallel.pipeline=2", "pipeline.layers_per_stage=[4]", "model.num_layers=4"], 2,
     "has 1 entries, parallel.pipeline=2"),
    (["parallel.pipeline=4", "model.num_layers=4", "pipeline.schedule=pipedream_2bw",
      "train.global_batch_size=4", "train.micro_batch_size=2"], 4,
     "needs m >= P-1: the window m = train.global_batch_size / (train.micro_batch_size x dp) "
     "= 2 < parallel.pipeline-1 = 3"),
    (["parallel.pipeline=2", "model.num_layers=4", "pipeline.schedule=pipedream_2bw",
      "optim.distributed_optimizer=true"], 4, "does not support optim.distributed_optimizer"),
    (["parallel.pipeline=2", "model.num_layers=4", "optim.distributed_optimizer=true"], 4,
     "cannot keep the embedding tied across pipeline stages"),
])
def test_pipeline_layout_errors(overrides, world, needle):
    with pytest.raises(ParallelConfigError) as e:
        validate_layout(load_config(None, overrides), world)
    assert needle in str(e.value)


def test_unknown_schedule_is_refused_before_process_groups_listing_the_registry():
    cfg = load_config(None, ["pipeline.schedule=gpipe", "parallel.pipeline=2"])
    with pytest.raises(ParallelConfigError, match="'gpipe'.*1f1b_flush, pipedream_2bw, paci"):
        validate_layout(cfg, 2)


def test_even_and_explicit_layer_split():
    from megatron_paci.pipeline.partition import partition_layers

    assert partition_layers(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert partition_layers(4, 2, [1, 3]) == [(0, 1), (1, 4)]


def test_process_group_backend_serves_cpu_and_cuda_tensors(monkeypatch):
    """With CUDA, NCCL carries the device tensors and gloo the CPU ones (checkpoint and
    RNG metadata): NCCL alone would refuse the first CPU tensor a collective gets."""
    import torch
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from megatron_paci.parallel import state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert BackendConfig(Backend(state._backend())).get_device_backend_map() == {
        "cpu": "gloo", "cuda": "nccl"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert state._backend() == "gloo"


def test_gpu_index_under_torchrun_and_slurm_binding(monkeypatch):
    import torch

    from megatron_paci.parallel.state import cuda_device_index

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # torchrun: all visible
    assert [cuda_device_index(r) for r in (0, 3, 7)] == [0, 3, 7]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1
    assert [cuda_device_index(r) for r in (0, 3, 7)] == [0, 0, 0]


def test_more_processes_than_gpus_is_refused_with_the_fix():
    from megatron_paci.parallel.state import check_gpus_for_ranks

    check_gpus_for_ranks(4, 8)
    check_gpus_for_ranks(8, 8)
    with pytest.raises(ParallelConfigError) as e:
        check_gpus_for_ranks(8, 4)
    assert "8 processes on this node (LOCAL_WORLD_SIZE) but 4 visible GPU(s)" in str(e.value)
    assert "torchrun --nproc_per_node 4" in str(e.value) and "train.device=cpu" in str(e.value)
