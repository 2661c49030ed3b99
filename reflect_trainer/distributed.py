"""``reflect-trainer recycle`` data-parallel under ``torchrun`` or ``accelerate launch``, on one node or many.

Every rank recycles its shard into the one shared cache; rank 0 then writes the export, reading every row from the
cache, so the export is the one a 1-process run writes.

Shards. The 1-process run's batches of ``batch_size`` rows are dealt out in turn: batch ``b`` goes to rank
``b % world_size``. Whole batches, so every oracle call holds exactly the prompts it holds in a 1-process run: an
engine whose numbers depend on what else is in the batch (left padding) writes the same text, and the export is
identical. In turn rather than in contiguous blocks, because data sets are often ordered (by source, by length):
dealing spreads long and short rows over the ranks, and they finish together. Shards never overlap; if they did,
the cache would still generate each prompt once, but ranks would wait on each other instead of working.

Coordination. One collective at the start (``torch.distributed`` over gloo: a run id from rank 0, then a barrier),
none at the end. Each rank holds a lease on "my shard of this run" in ``<cache_dir>/ranks`` (the cache's own claim
protocol, heartbeat included) from before the barrier until its shard is stored; rank 0, done with its own shard,
waits on those leases. A rank that finishes stores its counters and exits. A rank that dies after the barrier loses
its lease (at once when the death can be proven on rank 0's machine, else after ``claim_lease_seconds`` without a
heartbeat): rank 0 takes the shard over and recycles what it left, the dead rank's row claims being taken over the
same way, and the rows it finished read from the cache. No rank ever waits on a barrier for a dead peer. (``torchrun``
itself stops the whole job when a worker exits with an error, unless told otherwise; a rerun then continues from the
cache.)
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

from .cache import RecycleCache
from .formats import validate_rows
from .schema import oracle_tokens_per_s

logger = logging.getLogger(__name__)

#: Counters of the oracle work, summed over the shards (the final pass reads everything from the cache).
SHARD_COUNTERS = ("cache_hits", "cache_misses", "waited_for_other_writer", "claims_taken_over", "cache_leases_lost",
                  "oracle_calls", "oracle_prompts", "oracle_tokens", "oracle_seconds", "scores_computed",
                  "scores_cached")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launch: ``torchrun`` and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` for every process they start (accelerate starts its processes through torchrun's launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_launch(environ=None) -> Launch:
    """The launch this process belongs to; a plain ``python``/``reflect-trainer`` call is rank 0 of 1."""
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({err}); they are set by torchrun or "
                         "accelerate launch") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
    return Launch(rank, world_size, local_rank)


def shard_indices(n_rows: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Rows of ``rank``'s shard: the 1-process run's batches ``rank``, ``rank + world_size``, ..., whole."""
    n_batches = -(-n_rows // batch_size)
    batches = (range(b * batch_size, min(n_rows, (b + 1) * batch_size)) for b in range(rank, n_batches, world_size))
    return [i for batch in batches for i in batch]


def pin_local_gpu(launch: Launch) -> None:
    """One GPU per rank on a node: keep only the ``LOCAL_RANK``-th visible device, so a local engine (transformers,
    vLLM) runs on its own GPU. Must run before anything starts CUDA (CUDA reads ``CUDA_VISIBLE_DEVICES`` once), so
    the GPUs are counted without CUDA: ``CUDA_VISIBLE_DEVICES`` if set, else the NVIDIA driver's ``/proc`` entries.
    Nothing to do with one process, or with at most one device."""
    if not launch.distributed:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        gpus = Path("/proc/driver/nvidia/gpus")
        devices = [str(i) for i in range(len(list(gpus.iterdir())))] if gpus.is_dir() else []
    if len(devices) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[launch.local_rank % len(devices)]
        logger.info("rank %d: local engines see GPU %s only", launch.rank, os.environ["CUDA_VISIBLE_DEVICES"])


def recycle_distributed(make_recycler: Callable, dataset, batch_size: int, launch: Launch,
                        start_timeout: float = 1800.0):
    """Recycle ``dataset`` with ``launch.world_size`` processes sharing ``make_recycler().config.cache_dir``.

    ``make_recycler()`` builds a :class:`~reflect_trainer.recycler.Recycler` (the same configuration on every rank).
    Returns, on rank 0, ``(recycled dataset, recycler of the final pass, summed shard counters)``; on other ranks
    ``None``, once their shard is stored. ``start_timeout``: how long the start's rendezvous waits for every rank.
    """
    recycler = make_recycler()
    config = recycler.config
    # On every rank, before the rendezvous: a bad row (on_bad_row="error") stops them all alike, none waits.
    report = validate_rows(dataset, config.on_bad_row, config.max_field_chars)
    valid = dataset.select(report.valid_indices) if report.skipped else dataset
    run_id = _rendezvous(launch, start_timeout)
    ranks = RecycleCache(Path(config.cache_dir) / "ranks", claim_lease_seconds=config.claim_lease_seconds,
                         max_wait_seconds=float("inf"))  # a live rank's shard is never taken from it
    keys = [f"{run_id}-rank{r:05d}" for r in range(launch.world_size)]

    def own_shard(mine: list[str]):
        # Our lease is held now, and the others' once the barrier opens: from here on, a missing lease means dead.
        _barrier_then_leave()
        return [_recycle_shard(recycler, valid, batch_size, launch.rank, launch.world_size, keys[launch.rank])], {}

    fetched = ranks.get_or_generate([keys[launch.rank]], own_shard)
    done = [fetched.records[keys[launch.rank]]]
    if launch.rank != 0:
        return None

    def take_over(dead: list[str]):
        """Shards whose rank died (or went silent past the lease): recycle what they left, here."""
        records = []
        for key in dead:
            rank = keys.index(key)
            logger.warning("rank %d stopped before its shard was stored: rank 0 recycles what it left", rank)
            records.append(_recycle_shard(recycler, valid, batch_size, rank, launch.world_size, key))
        return records, {}

    waited = time.perf_counter()
    others = ranks.get_or_generate(keys[1:], take_over)
    done += [others.records[k] for k in keys[1:]]
    logger.info("every shard is stored (waited %.1f s for the other ranks)", time.perf_counter() - waited)
    recycler.release_oracle()
    # The export: a fresh recycler (fresh counters) over the whole data set, in the 1-process run's batches, every
    # record read from the cache. It would generate a row only if one were missing; none is.
    final = make_recycler()
    recycled = final.recycle_dataset(dataset, batch_size=batch_size)
    totals = {name: sum(r["stats"].get(name, 0) for r in done) for name in SHARD_COUNTERS}
    totals["world_size"] = launch.world_size
    totals["shards_taken_over"] = others.generated
    return recycled, final, totals


def merged_stats(final_stats: dict, totals: dict) -> dict:
    """The final pass's counters (rows, phases, fallbacks: the export's) with the oracle work summed over shards."""
    stats = {**final_stats, **totals}
    stats["oracle_tokens_per_s"] = oracle_tokens_per_s(stats)
    return stats


def _recycle_shard(recycler, valid, batch_size: int, rank: int, world_size: int, key: str) -> dict:
    rows = shard_indices(len(valid), batch_size, rank, world_size)
    if not rows:
        logger.warning("rank %d has no rows: %d rows make %d batches of %d for %d ranks (a smaller --batch-size "
                       "gives every rank work)", rank, len(valid), -(-len(valid) // batch_size), batch_size,
                       world_size)
    started = time.perf_counter()
    before = recycler.stats()
    if rows:
        recycler.recycle_dataset(valid.select(rows), batch_size=batch_size)
    after = recycler.stats()
    stats = {k: after.get(k, 0) - before.get(k, 0) for k in SHARD_COUNTERS}
    return {"key": key, "raw": "", "rank": rank, "rows": len(rows), "seconds": time.perf_counter() - started,
            "stats": stats}


def _rendezvous(launch: Launch, timeout: float) -> str:
    """Join the launch's process group (gloo: CPU only, nothing on the GPUs) and agree on a run id."""
    import torch.distributed as dist

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={launch.world_size} but {' and '.join(missing)} not set: start "
                           "`reflect-trainer recycle` with torchrun or accelerate launch")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout))
    box = [uuid.uuid4().hex[:16] if launch.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier_then_leave() -> None:
    """The start's barrier, then leave the group: no collective follows, so no rank can hang on a dead one."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
