"""Generation buffers that leave the Trainer's order alone: look ahead in it instead of replacing it.

The Trainer's own sampler (random, sequential, ``group_by_length``...), batching (``dataloader_drop_last``) and
accelerate's per-rank sharding decide which rows each step trains on, exactly as in ``SFTTrainer``: steps per epoch
and the LR schedule are the same by construction. To still send the oracle one large request per
``buffer_batches`` micro-batches (TRL's GRPO generation-buffer pattern), the sampler *records* each epoch's order as
it is drawn (:func:`record_order`), and :func:`rank_batches` replays accelerate's batching and sharding classes on the
recorded order to list the micro-batches this rank will be given. The collator then recycles a micro-batch together
with the next ``buffer_batches - 1`` ones. Correctness never depends on the look-ahead: a row not yet recycled when
its micro-batch comes (an unknown sampler, a resumed run) is recycled on the spot.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import BatchSampler


def record_order(sampler) -> bool:
    """Make ``sampler`` keep the order of its latest pass in ``sampler.recorded_order``; same order, same RNG use.

    The instance's class is swapped for a subclass (so ``isinstance`` checks by the Trainer and accelerate still
    hold, e.g. ``SeedableRandomSampler``'s epoch seeding). Returns ``False`` for a sampler that cannot be recorded.
    """
    if sampler is None:
        return False
    base = type(sampler)
    if base.__name__.startswith("Recording"):
        return True

    def __iter__(self):
        self.recorded_order = order = list(base.__iter__(self))  # drawn whole at once: same draws, same RNG use
        yield from order

    try:
        sampler.__class__ = type(f"Recording{base.__name__}", (base,), {"__iter__": __iter__})
    except TypeError:
        return False
    sampler.recorded_order = None
    return True


def rank_batches(batch_sampler, order: list[int]) -> list[list[int]] | None:
    """The micro-batches (lists of dataset positions) that ``batch_sampler`` yields when its sampler draws ``order``.

    ``batch_sampler`` is the prepared data loader's: a ``BatchSampler``, or accelerate's ``BatchSamplerShard`` (per
    rank, with its ``even_batches``/``split_batches``) around one. The same classes are run on the recorded order, so
    the answer is theirs. ``None`` for batch samplers this cannot replay (e.g. a rank-aware ``batch_rebalance``).
    """
    from accelerate.data_loader import BatchSamplerShard

    if isinstance(batch_sampler, BatchSamplerShard):
        inner = batch_sampler.batch_sampler
        if type(inner) is not BatchSampler and not isinstance(inner, BatchSampler):
            return None
        replay = BatchSamplerShard(BatchSampler(order, inner.batch_size, inner.drop_last),
                                   num_processes=batch_sampler.num_processes,
                                   process_index=batch_sampler.process_index,
                                   split_batches=batch_sampler.split_batches,
                                   even_batches=batch_sampler.even_batches)
        return [list(b) for b in replay]
    if isinstance(batch_sampler, BatchSampler) and type(batch_sampler).__iter__ is BatchSampler.__iter__:
        return [list(b) for b in BatchSampler(order, batch_sampler.batch_size, batch_sampler.drop_last)]
    return None


def loader_sampler(loader):
    """``(batch_sampler, sampler)`` of a data loader prepared by accelerate (``None`` where there is none)."""
    from accelerate.data_loader import BatchSamplerShard

    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = batch_sampler.batch_sampler if isinstance(batch_sampler, BatchSamplerShard) else batch_sampler
    return batch_sampler, getattr(inner, "sampler", None)


class LookAhead:
    """This rank's micro-batches of the current pass, replayed from the order the Trainer's sampler drew: which
    buffer a micro-batch belongs to, and which comes next (to recycle it in the background).

    Args:
        position_row: the prepared data set's position -> source row (what the sampler draws -> what is recycled).
    """

    def __init__(self, position_row: np.ndarray):
        self._position_row = position_row
        self._loader = None  # (batch sampler, sampler) of the training data loader
        self._order = None  # the recorded order the batches were replayed from
        self._rows: np.ndarray | None = None  # this pass's micro-batches, flat (source rows) ...
        self._starts: np.ndarray | None = None  # ... and where each starts (plus the end)
        self._cursor = 0  # the next micro-batch expected

    def follow(self, loader) -> None:
        """Look ahead in ``loader``'s order from now on (the Trainer builds a loader per ``train()``)."""
        batch_sampler, sampler = loader_sampler(loader)
        self._loader = (batch_sampler, sampler) if record_order(sampler) else None
        self._order = self._rows = self._starts = None

    def new_pass(self) -> np.ndarray | None:
        """This rank's source rows of a pass that has just started (once per pass; empty where the order cannot
        be replayed); ``None`` while the pass is the one already seen, or with no look-ahead."""
        if self._loader is None:
            return None
        batch_sampler, sampler = self._loader
        order = getattr(sampler, "recorded_order", None)
        if order is None or order is self._order:
            return None
        self._order, self._cursor, self._rows, self._starts = order, 0, None, None
        positions = rank_batches(batch_sampler, order)
        if positions is None:
            return np.zeros(0, dtype=np.int64)
        starts = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in positions], out=starts[1:])
        flat = np.fromiter((p for b in positions for p in b), dtype=np.int64, count=int(starts[-1]))
        self._rows, self._starts = self._position_row[flat], starts
        return self._rows

    @property
    def batches(self) -> int:
        """How many micro-batches this rank has in the current pass (0: no look-ahead)."""
        return 0 if self._starts is None else len(self._starts) - 1

    def buffers(self, rows: list, size: int) -> tuple[list, list, bool]:
        """``(buffer, next buffer, at a buffer start)`` for the micro-batch of source ``rows``: buffers are
        ``size`` micro-batches of this rank's pass, aligned on its first. Without look-ahead, or for a micro-batch
        not found in the pass: the micro-batch alone, as its own buffer."""
        found = next((i for i in range(self._cursor, self.batches) if self._slice(i, i + 1) == rows), None)
        if found is None:
            return rows, [], True
        self._cursor = found + 1
        start = found - found % size
        return self._slice(start, start + size), self._slice(start + size, start + 2 * size), found == start

    def _slice(self, first: int, end: int) -> list:
        """The source rows of micro-batches ``first..end-1`` (clipped to the pass)."""
        n = self.batches
        return self._rows[self._starts[min(first, n)] : self._starts[min(end, n)]].tolist()
