"""One ``Recycler`` over one data set, as the recycling tests and benchmarks run it (no progress bar)."""

from __future__ import annotations


def recycle(data, oracle, cache_dir, scorer=None, **config):
    """Recycle ``data`` (a ``Dataset`` or a list of rows) through ``oracle`` with a fresh ``Recycler`` whose
    ``ReflectionConfig`` is ``config`` plus ``cache_dir``; returns ``(recycled dataset, recycler)``."""
    from datasets import Dataset

    from reflect_trainer import Recycler, ReflectionConfig

    if isinstance(data, list):
        data = Dataset.from_list(data)
    recycler = Recycler(ReflectionConfig(cache_dir=str(cache_dir), progress_bar=False, **config), oracle=oracle,
                        scorer=scorer)
    return recycler.recycle_dataset(data), recycler
