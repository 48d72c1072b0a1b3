"""Data-parallel, resumable batch sampler (Megatron's MegatronPretrainingSampler).

Samples are consumed in global blocks of micro_batch_size * data_parallel_size; each
rank takes its contiguous slice of every block. Because the order is a pure function
of `consumed_samples`, a resumed run continues exactly where the interrupted one
stopped, whatever the data-parallel size was.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class PretrainingSampler:
    """Yields this rank's micro-batches of sample indices, starting at consumed_samples."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples must be in [0, total_samples={total_samples}), "
                f"got {consumed_samples}"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise ValueError(f"data_parallel_size must be > 0, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank must be in [0, data_parallel_size={data_parallel_size}), "
                f"got {data_parallel_rank}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.block = micro_batch_size * data_parallel_size

    def _slice(self, block_start: int, block_end: int) -> list[int]:
        start = block_start + self.data_parallel_rank * self.micro_batch_size
        end = min(start + self.micro_batch_size, block_end)
        return list(range(start, end))

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while start + self.block <= self.total_samples:
            yield self._slice(start, start + self.block)
            start += self.block
        # Partial last block: only without drop_last, and only if this rank has a share
        # (ranks may then disagree on the number of batches).
        if not self.drop_last and start < self.total_samples:
            tail = self._slice(start, self.total_samples)
            if tail:
                yield tail

    def __len__(self) -> int:
        """Number of micro-batches this rank yields."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.block)
        if not self.drop_last and rest > self.data_parallel_rank * self.micro_batch_size:
            full += 1
        return full


def build_pretraining_data_loader(
    dataset: torch.utils.data.Dataset | None,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader | None:
    """DataLoader over `dataset` driven by PretrainingSampler; None for no dataset."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: creating an iterator must not draw from the global
        # torch RNG, or a resumed run's dropout masks would drift from the original.
        generator=torch.Generator(),
    )
