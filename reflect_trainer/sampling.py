"""Generation buffers: the sampler that lets one oracle call cover several micro-batches (TRL's GRPO pattern).

Each epoch's shuffled order is cut into *global buffers* of ``batch_size * buffer_batches * world_size`` indices.
Each buffer is yielded ``buffer_batches`` times, every index tagged with the repeat number: ``(index, k)``. The
DataLoader's batch size is ``batch_size * buffer_batches``, so accelerate's ``BatchSamplerShard`` hands rank ``r`` the
``r``-th slice of every buffer — a per-rank index shard — ``buffer_batches`` times in a row. The collator recycles
the slice once (one oracle call for all its pairs) and returns micro-batch ``k`` of it on the ``k``-th repeat.

Because the repeat number travels with the index, resuming mid-buffer (``skip_first_batches``) still returns the
right micro-batch. The last buffer is filled up with indices from the start of the order (as ``DistributedSampler``
pads), so every buffer is whole; a few pairs are then seen twice in that epoch, never recycled twice.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class RecycleBufferSampler(Sampler):
    def __init__(self, num_rows: int, batch_size: int, buffer_batches: int, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0):
        if num_rows <= 0:
            raise ValueError("the training data set is empty")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.buffer_batches = buffer_batches
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    @property
    def buffer_size(self) -> int:
        """Indices in one global buffer (all ranks)."""
        return self.batch_size * self.buffer_batches * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """The epoch's index order, padded to whole buffers."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        short = -len(order) % self.buffer_size
        while short:
            order += order[:short]
            short = -len(order) % self.buffer_size
        return order

    def rank_slices(self, epoch: int, rank: int) -> list[list[int]]:
        """Rank ``rank``'s slice of every buffer of ``epoch``, in order: what its collator sees."""
        order, per_rank = self.order(epoch), self.batch_size * self.buffer_batches
        return [order[start + rank * per_rank : start + (rank + 1) * per_rank]
                for start in range(0, len(order), self.buffer_size)]

    def rank_share(self, epoch: int, rank: int) -> set[int]:
        """Indices that rank ``rank`` draws in ``epoch``."""
        return {i for piece in self.rank_slices(epoch, rank) for i in piece}

    def __iter__(self):
        order = self.order(self.epoch)
        for start in range(0, len(order), self.buffer_size):
            buffer = order[start : start + self.buffer_size]
            for k in range(self.buffer_batches):
                for index in buffer:
                    yield (index, k)

    def __len__(self) -> int:
        return len(self.order(self.epoch)) * self.buffer_batches


class IndexDataset(torch.utils.data.Dataset):
    """Hands the sampler's ``(index, k)`` through to the collator, which does the real work."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, item):
        return item
