"""ZeRO-1 state as pieces of the global tensors, so DCP writes it without a gather.

A ZeRO-1 rank owns a contiguous run of the flat gradient buffer: for each parameter, a
run of its elements in row-major order, which is not a rectangular block. Cut into the
few blocks it is made of (a partial first row, whole rows, a partial last row, and so
on down the dimensions), each block is a contiguous view of the rank's moment shard and
has an offset in the global tensor (the tp shard's offset added). DCP stores each block
under the parameter's global name, so a checkpoint written by a ZeRO-1 rank is the same
global tensor as one written whole, and any layout reads the blocks it needs: a
one-process load gets the whole tensor; a ZeRO-1 load fills its own blocks in place.

``FlatShard`` speaks DCP's checkpointable protocol (``__create_write_items__``,
``__create_chunk_list__``, ``__get_tensor_shard__``); it is not a tensor, so the save and
load planners look it up by offset themselves (``lookup``), and DCP's staging for an
asynchronous save copies it through ``__deepcopy__``: the blocks only, to host memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megatron_paci.optim.distributed_optimizer import FlatSlice

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def row_major_boxes(shape: Sequence[int], start: int, length: int) -> list[Box]:
    """The rectangular blocks, in memory order, that elements ``[start, start+length)``
    of a row-major tensor of ``shape`` make up; each is contiguous in memory."""
    if length <= 0:
        return []
    if len(shape) == 0:
        return [((), ())]
    inner = math.prod(shape[1:])
    rest = tuple(shape[1:])
    end, out = start + length, []
    row, col = divmod(start, inner)
    if col:  # the partial first row
        take = min(inner - col, length)
        out += [((row,) + o, (1,) + s) for o, s in row_major_boxes(rest, col, take)]
        start += take
    whole = (end - start) // inner
    if whole:
        out.append(((start // inner,) + (0,) * len(rest), (whole,) + rest))
        start += whole * inner
    if start < end:  # the partial last row
        out += [((start // inner,) + o, (1,) + s)
                for o, s in row_major_boxes(rest, 0, end - start)]
    return out


class FlatShard:
    """One parameter's ZeRO-1 moment slices on this rank, as blocks of the global tensor."""

    def __init__(self, pieces: list[tuple[tuple[int, ...], torch.Tensor]],
                 global_shape: torch.Size) -> None:
        self.pieces = pieces  # (global offsets, a view of the block's shape)
        self.shape = torch.Size(global_shape)
        self.dtype = pieces[0][1].dtype
        self.device = pieces[0][1].device

    @classmethod
    def of(cls, slices: list[FlatSlice], tp_dim: int | None, tp_rank: int,
           tp_size: int) -> FlatShard:
        """``slices`` of a tp shard (``tp_dim``) as blocks of the global tensor."""
        local = slices[0].shape
        shift = [0] * len(local)
        full = list(local)
        if tp_dim is not None and tp_size > 1:
            shift[tp_dim] = tp_rank * local[tp_dim]
            full[tp_dim] *= tp_size
        pieces = []
        for s in slices:
            pos = 0
            for offsets, sizes in row_major_boxes(local, s.start, s.values.numel()):
                n = math.prod(sizes)
                pieces.append((tuple(o + d for o, d in zip(offsets, shift, strict=True)),
                               s.values[pos:pos + n].view(sizes)))
                pos += n
        return cls(pieces, torch.Size(full))

    def size(self) -> torch.Size:
        return self.shape

    def fill_from(self, full: torch.Tensor) -> None:
        """Copy each block from the global tensor ``full``."""
        for offsets, view in self.pieces:
            src = full
            for d, (o, n) in enumerate(zip(offsets, view.shape, strict=True)):
                src = src.narrow(d, o, n)
            view.copy_(src)

    # --- DCP's checkpointable protocol -------------------------------------------

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)),
                          type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(torch.Size(offsets), view.shape),
                              properties=TensorProperties.create_from_tensor(view),
                              size=self.shape))
                for offsets, view in self.pieces]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(offsets), view.shape)
                for offsets, view in self.pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        want = tuple(index.offset)
        hint = index.index
        if hint is not None and hint < len(self.pieces) and self.pieces[hint][0] == want:
            return self.pieces[hint][1]
        for offsets, view in self.pieces:
            if offsets == want:
                return view
        raise ValueError(f"{index.fqn}: no ZeRO-1 block at offset {list(want)} on this rank")

    def __deepcopy__(self, memo: dict) -> FlatShard:
        # The blocks alone, on the host: the default would copy each view's whole storage.
        return FlatShard([(o, v.detach().to("cpu", copy=True)) for o, v in self.pieces],
                         self.shape)


def set_aside(tree: dict[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Take the ``FlatShard`` entries out of a nested dict, leaving empty tensors in
    their place: DCP's load set-up replaces what it does not know with None."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, FlatShard):
            out[(*path, key)] = value
            tree[key] = torch.empty(0)
        elif isinstance(value, dict):
            out.update(set_aside(value, (*path, key)))
    return out


def put_back(tree: dict[str, Any], aside: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """Undo ``set_aside``; return the entries under DCP's flattened names."""
    for path, value in aside.items():
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return {".".join(path): value for path, value in aside.items()}


def lookup(state_dict: dict[str, Any], index: MetadataIndex) -> Any:
    """The planners' lookup for a ``FlatShard`` entry; None for anything else."""
    obj = state_dict.get(index.fqn)
    return obj.__get_tensor_shard__(index) if isinstance(obj, FlatShard) else None
