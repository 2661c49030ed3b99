"""What ``ReflectionSFTTrainer`` trains on, row by row: each row's recycled, TRL-prepared features, and its export row.

Two sources, one class each:

- :class:`RecycledRows`, a map-style data set. SFTTrainer prepares the *original* rows as usual; the collator then
  asks :meth:`RecycledRows.features` for a micro-batch's rows, which recycles them one look-ahead buffer at a time
  (:class:`~.sampling.LookAhead`) and prepares the recycled rows with SFTTrainer's own code (``prepare``).
- :class:`RecycledStream`, an ``IterableDataset``: :meth:`RecycledStream.transform` is a ``.map`` in front of TRL's
  lazy preparation, so accelerate shards and reshuffles the stream exactly as for SFTTrainer.

Memory: what is remembered per row for the export and a resume (the features a row trained on, its export row) is
written to a per-rank anonymous file as it is produced (:mod:`.ledger`); in memory stay a few numpy arrays of a few
bytes a row. A row's exchange is recomputed from the source when the oracle needs it.

Threads: with ``overlap`` on, the oracle phases of the *next* buffer run in one background thread while the current
buffer trains; the recycler is never used by two threads at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from .exchange import alpaca_conversation, exchange, with_recycled
from .formats import BadRowError, read_row
from .ledger import RowLedger
from .sampling import LookAhead
from .schema import DROPPED_BY_SELECTION

logger = logging.getLogger(__name__)

ROW = "_reflect_row"  # column that carries a row's identity through TRL's preparation to the collator
# What a row was trained on (export column ``trained_version``).
RECYCLED, ORIGINAL, NOTHING = "recycled", "original", "nothing"
_FORMAT_COLUMNS = ("instruction", "input", "output", "prompt", "completion", "messages", "conversations")


def trl_rows(dataset, alpaca_as_conversation: bool):
    """Alpaca rows (no formatting_func) as conversational prompt/completion, which SFTTrainer trains on; other
    formats as given. Also for ``eval_dataset`` (a dict of them too)."""
    if dataset is None or not alpaca_as_conversation:
        return dataset
    if isinstance(dataset, dict):
        return type(dataset)({k: trl_rows(v, True) for k, v in dataset.items()})
    if "prompt" in (dataset.column_names or ()):
        return dataset
    return dataset.map(lambda r: alpaca_conversation(r["instruction"], r.get("input") or "", r["output"]))


def index_source(dataset, fmt: str, max_field_chars: int, on_bad_row: str) -> tuple:
    """``(source, reflectable, skipped)``: bad rows raise (naming the row and field) or are left out and returned
    as errors, before any model or oracle work; each kept row is tagged with its identity (column :data:`ROW`).

    Only whether a row has an exchange is kept (a bool a row): :meth:`RecycledRows._pair` computes it again."""
    reflectable, keep, skipped = [], [], []
    for i, row in enumerate(dataset):
        pair = read_row(row, fmt, i, max_field_chars, on_bad_row)
        if isinstance(pair, BadRowError):
            skipped.append(pair)
        else:
            reflectable.append(pair is not None)
            keep.append(i)
    if skipped:
        logger.warning("left out %d of %d rows as bad input", len(skipped), len(dataset))
        dataset = dataset.select(keep)
    reflectable = np.array(reflectable, dtype=bool)
    if not reflectable.any():
        logger.warning("no row has an instruction/response exchange to reflect: training on the data as given")
    return dataset.add_column(ROW, list(range(len(dataset)))), reflectable, skipped


def stream_row_key(row: dict) -> str:
    """A streamed row's identity: the hash of its content (positions change when a stream is reshuffled)."""
    return hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _RowRecycling:
    """What both sources share: the export ledger, the counters, the export row, the oracle's release."""

    def __init__(self, fmt: str, alpaca_as_conversation: bool, n_rows: int | None, ledger_dir: str,
                 release_oracle: bool):
        self.fmt, self.alpaca_as_conversation = fmt, alpaca_as_conversation
        self.recycler = None  # set by the trainer once the student exists (selective mode scores with it)
        # row -> export row (the row as trained on, the original, the recycling columns; None: a bad row left out)
        self.exported = RowLedger(n_rows, ledger_dir)
        self.counts = {"rows_passed_through": 0, "rows_fully_masked_fallback": 0, "rows_dropped_by_trl": 0}
        self._release = release_oracle

    def _records(self, reflected, n: int) -> list[dict]:
        """The recycling columns of ``n`` reflected rows, finished in this thread (selective scoring)."""
        columns = self.recycler.finish(reflected)
        return [{name: columns[name][j] for name in self.recycler.columns} for j in range(n)]

    def _reflect_pairs(self, pairs: list, keys: list):
        batch = {"instruction": [p.instruction for p in pairs], "input": [p.input for p in pairs],
                 "output": [p.output for p in pairs]}
        return self.recycler.reflect(batch, list(keys))

    def _with_recycled(self, row: dict, record: dict) -> dict:
        return with_recycled(row, self.fmt, record["recycled_instruction"], record["recycled_input"],
                             record["recycled_output"], self.alpaca_as_conversation)

    def export_row(self, source: dict, recycled: dict | None, version: str) -> dict:
        """The row as trained on (in the user's format), its original format columns, and the recycling columns."""
        source = {k: v for k, v in source.items() if k != ROW}
        if self.alpaca_as_conversation:
            source.update(alpaca_conversation(source["instruction"], source.get("input") or "", source["output"]))
        row = dict(self._with_recycled(source, recycled) if version == RECYCLED else source)
        for name in _FORMAT_COLUMNS:
            if name in source:
                row[f"original_{name}"] = source[name]
        row.update(recycled or dict.fromkeys(self.recycler.columns))
        row["trained_version"] = version
        return row

    def release_oracle(self, why: str) -> None:
        if self._release and self.recycler.oracle_loaded:
            logger.info("%s: releasing the oracle", why)
            self.recycler.release_oracle()
            self.recycler.close_progress()

    def _export_rows(self, rows: list, include_dropped: bool, add_trained: set | None) -> list[dict]:
        out = []
        for r in rows:
            row = self.exported[r]
            if row is None or (row["trained_version"] == NOTHING and not include_dropped):
                continue
            out.append({**row, "trained": r in add_trained} if add_trained is not None else row)
        return out


class RecycledRows(_RowRecycling):
    """A map-style data set, recycled one look-ahead buffer at a time, in the Trainer's order.

    Args:
        source: the validated rows, with :data:`ROW` (:func:`index_source`).
        reflectable: per row, whether it has an exchange to reflect.
        prepared: SFTTrainer's prepared data set of the original rows (TRL may have dropped some).
        prepare: ``rows -> {row: {input_ids, labels}}`` by SFTTrainer's own preparation (rows TRL drops absent).
        config: the :class:`~.config.ReflectionConfig` (``buffer_batches``, ``max_field_chars``, ``release_oracle``).
        overlap: recycle the next buffer in a background thread.
    """

    def __init__(self, source, reflectable: np.ndarray, prepared, prepare: Callable[[list[dict]], dict], *,
                 fmt: str, alpaca_as_conversation: bool, config, overlap: bool, ledger_dir: str):
        n_rows = len(source)
        super().__init__(fmt, alpaca_as_conversation, n_rows, ledger_dir, config.release_oracle)
        self.source, self.reflectable, self._prepared_dataset, self._prepare = source, reflectable, prepared, prepare
        self._max_field_chars, self._buffer_batches = config.max_field_chars, config.buffer_batches
        # row -> features trained on (None: the original, as SFTTrainer prepared it)
        self.prepared = RowLedger(n_rows, ledger_dir)
        # The prepared data set: position -> source row (after TRL's filtering), and back (-1: TRL dropped it,
        # having no trainable token within max_length: as in SFTTrainer, but counted).
        position_row = np.asarray(prepared[ROW], dtype=np.int64)
        self._row_position = np.full(n_rows, -1, dtype=np.int64)
        self._row_position[position_row] = np.arange(len(position_row), dtype=np.int64)
        self.counts["rows_dropped_by_trl"] = n_rows - len(position_row)
        self.lookahead = LookAhead(position_row)
        self._share_left = np.zeros(n_rows, dtype=bool)  # this rank's rows of the current pass not recycled yet
        self._share_count = 0  # how many
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recycle") if overlap else None
        self._prefetched: dict[tuple, Future] = {}

    def __len__(self) -> int:
        return len(self.source)

    def features(self, rows: list, features: list[dict]) -> list[dict]:
        """The recycled, TRL-prepared features of a micro-batch's rows (``features``: SFTTrainer's, of the originals).

        Buffers are aligned on this rank's micro-batches (``0..buffer_batches-1``, then the next ones...), and every
        rank materializes at every buffer start, with or without rows to recycle: with a sharded student (ZeRO-3)
        selective scoring is collective, so all ranks must make the same calls.
        """
        share = self.lookahead.new_pass()
        if share is not None:
            self._share_left[:] = False
            self._share_left[share] = True
            self._share_left &= ~self.prepared.present()
            self._share_count = int(self._share_left.sum())
            self.recycler.expect_rows(self._share_count)
        buffer, following, boundary = self.lookahead.buffers(rows, self._buffer_batches)
        if boundary or any(r not in self.prepared for r in rows):
            self.materialize([r for r in dict.fromkeys([*rows, *buffer]) if r not in self.prepared])
            self._prefetch([r for r in dict.fromkeys(following) if r not in self.prepared])
        out = []
        for row, feature in zip(rows, features):
            prepared = self.prepared[row]
            out.append(prepared if prepared is not None else {k: feature[k] for k in ("input_ids", "labels")})
        if self.lookahead.batches and not self._share_count:
            self.release_oracle("every row of this rank's share is recycled")
        return out

    def materialize(self, rows: list) -> None:
        """Recycle (one oracle call per template step for all misses) and prepare ``rows`` with TRL's code."""
        reflect = [r for r in rows if self.reflectable[r]]
        pending = self._prefetched.pop(tuple(reflect), None)
        for stale in self._prefetched.values():  # never two threads in the recycler (its results are cached)
            stale.result()
        self._prefetched.clear()
        recycled = {}
        if reflect:
            reflected = pending.result() if pending is not None else self._reflect(reflect)
            recycled = dict(zip(reflect, self._records(reflected, len(reflect))))
        else:
            self.recycler.join_collective_scoring()
        sources = {r: self.source[r] for r in rows}
        versions = {}
        for r in rows:
            if r not in recycled:
                self.counts["rows_passed_through"] += 1
                versions[r] = ORIGINAL
            else:
                versions[r] = NOTHING if recycled[r]["skip_reason"] == DROPPED_BY_SELECTION else RECYCLED
        prepared = self._prepare([self._with_recycled(sources[r], recycled[r]) for r in rows
                                  if versions[r] == RECYCLED])
        for r in rows:
            if versions[r] == RECYCLED and r not in prepared:
                # TRL drops a row left without a trainable token (e.g. the recycled prompt fills max_length); the
                # original survived SFTTrainer's preparation, so the step trains on it rather than on nothing.
                versions[r] = ORIGINAL
                self.counts["rows_fully_masked_fallback"] += 1
            if versions[r] == RECYCLED:
                self.prepared[r] = prepared[r]
            elif versions[r] == NOTHING:  # the selection rule dropped it: the step keeps its slot, with no loss
                original = self._prepared_dataset[int(self._row_position[r])]
                self.prepared[r] = {"input_ids": original["input_ids"], "labels": [-100] * len(original["labels"])}
            else:
                self.prepared[r] = None
            self.exported[r] = self.export_row(sources[r], recycled.get(r), versions[r])
            if self._share_left[r]:
                self._share_left[r] = False
                self._share_count -= 1

    def _reflect(self, rows: list):
        """The oracle phases for ``rows`` (safe in the background thread)."""
        return self._reflect_pairs([self._pair(r) for r in rows], rows)

    def _pair(self, row: int):
        """Row ``row``'s exchange, computed again from the source (validated at set-up, so it cannot raise)."""
        return exchange(self.source[row], self.fmt, row, self._max_field_chars)

    def _prefetch(self, rows: list) -> None:
        """Start the oracle phases of this rank's next buffer in the background (``overlap``)."""
        reflect = tuple(r for r in rows if self.reflectable[r])
        if self._prefetcher is not None and reflect and reflect not in self._prefetched:
            self._prefetched[reflect] = self._prefetcher.submit(self._reflect, list(reflect))

    def release_oracle(self, why: str) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
        super().release_oracle(why)

    def export(self, rows: list, include_dropped: bool, add_trained: set | None = None) -> list[dict]:
        """The export rows of ``rows``; rows another rank trained come from the shared cache (no oracle call)."""
        self.materialize([r for r in rows if r not in self.prepared])
        return self._export_rows(rows, include_dropped, add_trained)

    def missing(self) -> list:
        """The rows never recycled here (never trained, or trained by another rank)."""
        return self.prepared.missing()


class RecycledStream(_RowRecycling):
    """An ``IterableDataset``, recycled by a transform in front of TRL's lazy preparation, one buffer per call.

    Every rank reads the whole stream and accelerate keeps its share (as for SFTTrainer: equal step counts on every
    rank, no hang at a partial accumulation step). Each rank therefore runs the recycler on every row; the shared
    cache's claims make each pair go to the oracle once, and later passes read the cache.
    """

    def __init__(self, *, fmt: str, alpaca_as_conversation: bool, config, ledger_dir: str):
        super().__init__(fmt, alpaca_as_conversation, None, ledger_dir, config.release_oracle)
        self._max_field_chars, self._on_bad_row = config.max_field_chars, config.on_bad_row

    def transform(self, batch: dict[str, list]) -> dict[str, list]:
        """The ``.map`` function: tags each row with its identity and, once the recycler is set (training), puts its
        recycled texts in; before (TRL reading the stream's columns) rows pass through."""
        n = len(next(iter(batch.values())))
        rows = [{k: batch[k][j] for k in batch} for j in range(n)]
        keys = [stream_row_key(r) for r in rows]
        if self.alpaca_as_conversation:
            rows = [{**r, **alpaca_conversation(r["instruction"], r.get("input") or "", r["output"])} for r in rows]
        out = [{**r, ROW: k} for r, k in zip(rows, keys)]
        if self.recycler is not None:
            out = self._recycle(out)
        return {name: [r[name] for r in out] for name in (out[0] if out else {**batch, ROW: None})}

    def _recycle(self, rows: list[dict]) -> list[dict]:
        fresh = [r for r in rows if r[ROW] not in self.exported]
        if not fresh:
            self.release_oracle("a pass over the stream is done")
        todo, pairs = [], []
        for r in fresh:
            pair = read_row(r, self.fmt, f"{r[ROW]} of the stream", self._max_field_chars, self._on_bad_row)
            if isinstance(pair, BadRowError):
                self.recycler.record_skipped([pair])
                self.exported[r[ROW]] = None
            elif pair is None:
                self.counts["rows_passed_through"] += 1
                self.exported[r[ROW]] = self.export_row(r, None, ORIGINAL)
            else:
                todo.append(r)
                pairs.append(pair)
        if todo:
            records = self._records(self._reflect_pairs(pairs, [r[ROW] for r in todo]), len(todo))
            for r, record in zip(todo, records):
                version = NOTHING if record["skip_reason"] == DROPPED_BY_SELECTION else RECYCLED
                self.exported[r[ROW]] = self.export_row(r, record, version)
        out = []
        for r in rows:
            exported = self.exported[r[ROW]]
            if exported is None:
                continue  # a bad row, left out (on_bad_row="skip")
            out.append(self._with_recycled(r, exported) if exported["trained_version"] == RECYCLED else r)
        return out

    def features(self, rows: list, features: list[dict]) -> list[dict]:
        """Streams arrive recycled and prepared; rows dropped by the selection rule train on nothing."""
        out = []
        for row, feature in zip(rows, features):
            feature = {k: feature[k] for k in ("input_ids", "labels")}
            exported = self.exported.get(row)
            if exported is not None and exported["trained_version"] == NOTHING:
                feature["labels"] = [-100] * len(feature["labels"])
            out.append(feature)
        return out

    def export(self, rows: list, include_dropped: bool, add_trained: set | None = None) -> list[dict]:
        missing = [r for r in rows if r not in self.exported]
        if missing:  # trained by another rank that recycled it: every rank recycles every streamed row
            raise RuntimeError(f"{len(missing)} trained rows were never recycled on this rank")
        return self._export_rows(rows, include_dropped, add_trained)
