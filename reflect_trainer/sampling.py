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
