"""Streamed (``datasets.IterableDataset``) training data: split by node, recycled buffer by buffer.

accelerate's default for an iterable data set makes every rank read the whole stream and keep 1/N of it — with a
lazy oracle that would be N times the oracle work (or, with batch dispatching, one rank recycling for all). Instead
each rank takes its own split (``datasets.distributed.split_dataset_by_node``) and the loader is *not* passed
through ``accelerator.prepare``; the Trainer moves each batch to the device itself.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import torch


class RecycledStream(torch.utils.data.IterableDataset):
    """Yields collated micro-batches: ``buffer_batches`` of them per oracle call.

    Args:
        source: This rank's split of the stream (rows as dicts).
        buffer_size: Rows per buffer (``per_device_train_batch_size * buffer_batches``).
        batch_size: Rows per micro-batch.
        process_buffer: Recycles and tokenizes a list of ``(position, row)``; returns one feature dict per row.
        collate: Pads features into a batch (SFTTrainer's collator).
        on_pass_end: Called when a full pass over the stream ends (the first one releases the oracle).
    """

    def __init__(self, source, buffer_size: int, batch_size: int, process_buffer: Callable, collate: Callable,
                 on_pass_end: Callable[[int], None]):
        self.source = source
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.process_buffer = process_buffer
        self.collate = collate
        self.on_pass_end = on_pass_end
        self.passes = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        rows = enumerate(iter(self.source))
        while buffer := list(itertools.islice(rows, self.buffer_size)):
            features = self.process_buffer(buffer)
            for start in range(0, len(features), self.batch_size):
                yield self.collate(features[start : start + self.batch_size])
        self.passes += 1
        self.on_pass_end(self.passes)
