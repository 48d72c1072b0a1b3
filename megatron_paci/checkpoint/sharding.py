"""Describe tensor-parallel shards to DCP, so one checkpoint loads into any tp size.

A tp rank's shard becomes a ``DTensor`` over the tp dimension of a device mesh
laid out like the process groups (pp, dp, tp); DCP then stores the global
tensor once, and a load with another tp size (or one process with plain
tensors) receives its own slice. Replicated tensors stay plain: DCP writes them
once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from megatron_paci.parallel.state import ParallelState

_MESH: DeviceMesh | None = None


def checkpoint_mesh(pstate: ParallelState, device_type: str) -> DeviceMesh:
    """The (pp, dp, tp) mesh, built once, with rank = tp + tp_size * (dp + dp_size * pp)."""
    global _MESH
    if _MESH is None:
        _MESH = init_device_mesh(
            device_type, (pstate.pipeline_size, pstate.data_size, pstate.tensor_size),
            mesh_dim_names=("pp", "dp", "tp"),
        )
    return _MESH


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def local_tensor(t: Any) -> torch.Tensor:
    """A DTensor's own shard; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def as_global(t: torch.Tensor, dim: int | None, pstate: ParallelState) -> Any:
    """``t`` as DCP should see it: a DTensor when it is a tp shard, else itself."""
    if dim is None or pstate.tensor_size == 1:
        return t
    full = list(t.shape)
    full[dim] *= pstate.tensor_size
    mesh = checkpoint_mesh(pstate, t.device.type)
    return DTensor.from_local(t, mesh["tp"], [Shard(dim)], run_check=False,
                              shape=torch.Size(full), stride=_contiguous_stride(full))
