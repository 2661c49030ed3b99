"""``ReflectionSFTTrainer``: ``trl.SFTTrainer`` that trains on the recycled stream.

Swap the class name in a TRL script and epoch 1 recycles each pair through the oracle as its generation buffer is
first drawn; later epochs read the cache. Overridden hooks: ``get_train_dataloader`` (buffer sampler + recycling
collator) and ``log`` (recycling counters). Everything else is SFTTrainer's.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch.utils.data import DataLoader
from trl import SFTConfig, SFTTrainer

from .chat import ensure_chat_template, features, tokenize_conversation
from .config import ReflectionConfig
from .export import recycled_conversation, to_sft_dataset
from .formats import ValidationReport, detect_format, pair_to_messages, row_to_pair, validate_rows
from .oracles import Oracle
from .recycler import Recycler
from .sampling import IndexDataset, RecycleBufferSampler
from .streaming import RecycledStream

logger = logging.getLogger(__name__)

# Counters summed over ranks for the Trainer's log.
_LOGGED_COUNTERS = (
    "rows_recycled", "rows_skipped", "cache_hits", "cache_misses", "oracle_calls", "oracle_prompts",
    "oracle_tokens", "oracle_seconds", "instruction_reflection/total", "instruction_reflection/parsed",
    "instruction_reflection/accepted", "response_reflection/total", "response_reflection/parsed",
    "response_reflection/accepted",
)


class ReflectionSFTTrainer(SFTTrainer):
    """``SFTTrainer`` on data recycled by Reflection-Tuning, lazily, during epoch 1.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as for
            ``trl.SFTTrainer``. ``train_dataset`` is in Alpaca, prompt–completion or ``messages`` format. A
            map-style ``datasets.Dataset`` is validated before anything else (bad rows raise naming the row, or are
            skipped, per ``reflection_config.on_bad_row``); a streamed ``IterableDataset`` (set ``max_steps``) is
            split by node and each row checked when its buffer is drawn. ``eval_dataset``, if given, is evaluated as is (not
            recycled).
        reflection_config: The recycling settings; defaults to ``ReflectionConfig()`` (embedded SmolLM2 oracle).
        oracle: An already-built oracle, instead of one built from ``reflection_config``.
    """

    _tag_names = ["trl", "sft", "reflection-tuning"]
    _name = "ReflectionSFT"

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, reflection_config: ReflectionConfig | None = None,
                 oracle: Oracle | None = None, **kwargs):
        if train_dataset is None:
            raise ValueError("ReflectionSFTTrainer needs a train_dataset to recycle")
        from datasets import Dataset, IterableDataset

        if not isinstance(train_dataset, (Dataset, IterableDataset)):
            raise TypeError(f"train_dataset must be a datasets.Dataset or IterableDataset, got {type(train_dataset)}")
        config = reflection_config or ReflectionConfig()
        self._streaming = isinstance(train_dataset, IterableDataset)
        if self._streaming:
            # A stream cannot be validated up front: its format is checked now, each row when its buffer comes.
            report = ValidationReport(fmt=detect_format(next(iter(train_dataset)).keys()), valid_indices=[], skipped={})
            source = train_dataset
        else:
            # Bad data must surface now, before any model, oracle or training work.
            report = validate_rows(train_dataset, config.on_bad_row, config.max_field_chars)
            source = train_dataset.select(report.valid_indices) if report.skipped else train_dataset
        if args is None:
            args = SFTConfig(output_dir="reflection-sft")
        if args.packing or args.padding_free:
            raise ValueError("ReflectionSFTTrainer tokenizes lazily per buffer; packing/padding_free are not supported")
        # We tokenize lazily ourselves; SFTTrainer must not .map() the raw data (it peeks at one raw row only).
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        # eval_dataset goes in raw (the Trainer checks it exists when eval_strategy is set) and is tokenized below.
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=source,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        ensure_chat_template(self._tokenizer)
        self._fmt = report.fmt
        self._source = source
        if self.args.dataloader_num_workers:
            logger.warning("ReflectionSFTTrainer recycles in the main process; ignoring dataloader_num_workers")
        device = config.oracle_device
        if device is None and self.accelerator.device.type == "cuda":
            device = str(self.accelerator.device)
        self.reflection_config = dataclasses.replace(
            config,
            oracle_device=device or "cpu",
            progress_bar=config.progress_bar and self.accelerator.is_local_main_process,
        )
        self.recycler = Recycler(self.reflection_config, oracle=oracle)
        self.recycler.record_skipped(report.skipped.values())
        self._recycled: dict[int, dict] = {}  # source index -> recycled row
        self._tokens: dict[int, tuple] = {}  # source index -> (input_ids, completion_start)
        self._buffer_key: tuple | None = None
        self._rank_share: set[int] = set()
        self._stream_recycled: list[dict] = []  # streamed data: rows recycled in the first pass, in order
        self._stream_passes_done = 0
        if eval_dataset is not None:
            self.eval_dataset = self._tokenize_original(eval_dataset)

    # ---- data ----------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self._streaming:
            return self._stream_dataloader()
        buffer_batches = self.reflection_config.buffer_batches
        sampler = RecycleBufferSampler(
            len(self._source),
            batch_size=self._train_batch_size,
            buffer_batches=buffer_batches,
            world_size=self.accelerator.num_processes,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        self._rank_share = sampler.rank_share(0, self.accelerator.process_index)
        self.recycler.expected_rows = len(self._rank_share)
        loader = DataLoader(
            IndexDataset(len(self._source)),
            batch_size=self._train_batch_size * buffer_batches,
            sampler=sampler,
            collate_fn=self._collate_buffer,
            num_workers=0,  # the collator runs the oracle and keeps the buffer: it must live in this process
            drop_last=False,
        )
        return self.accelerator.prepare(loader)

    def _collate_buffer(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """One dataloader batch is this rank's slice of a buffer; return its ``k``-th micro-batch."""
        k = items[0][1]
        indices = [i for i, _ in items]
        if tuple(indices) != self._buffer_key:
            self._materialize(indices)
            self._buffer_key = tuple(indices)
        size = len(indices) // self.reflection_config.buffer_batches
        micro = indices[k * size : (k + 1) * size]
        return self.data_collator([features(*self._tokens[i]) for i in micro])

    def _materialize(self, indices: list[int]) -> None:
        """Recycle (one oracle call per template step for all misses) and tokenize the rows not yet seen."""
        todo = sorted({i for i in indices if i not in self._tokens})
        if not todo:
            return
        for i, row in zip(todo, self._recycle_rows(self._source[todo], todo)):
            self._recycled[i] = row
            self._tokens[i] = self._tokenize_recycled(row)
        if self._rank_share <= self._tokens.keys():
            self._release_oracle("every pair of this rank's share is recycled")

    def _recycle_rows(self, batch: dict[str, list], indices: list) -> list[dict]:
        """Run the recycling transform on a batch; return one recycled row (dict) per input row."""
        out = self.recycler(batch, indices=indices)
        return [{name: values[j] for name, values in out.items()} for j in range(len(indices))]

    def _tokenize_recycled(self, row: dict) -> tuple:
        prompt, completion = recycled_conversation(row, self._fmt)
        return tokenize_conversation(self._tokenizer, prompt, completion, self.args.max_length)

    def _release_oracle(self, why: str) -> None:
        if self.reflection_config.release_oracle and self.recycler.oracle_loaded:
            logger.info("%s: releasing the oracle", why)
            self.recycler.release_oracle()
            self.recycler.close_progress()

    # ---- streamed data ---------------------------------------------------------------------------------------------
    def _stream_dataloader(self) -> DataLoader:
        from datasets.distributed import split_dataset_by_node

        split = split_dataset_by_node(self._source, rank=self.accelerator.process_index,
                                      world_size=self.accelerator.num_processes)
        stream = RecycledStream(
            split,
            buffer_size=self._train_batch_size * self.reflection_config.buffer_batches,
            batch_size=self._train_batch_size,
            process_buffer=self._process_stream_buffer,
            collate=self.data_collator,
            on_pass_end=self._stream_pass_end,
        )
        # Not passed through accelerator.prepare: the split above is already this rank's (see streaming.py).
        return DataLoader(stream, batch_size=None, num_workers=0)

    def _process_stream_buffer(self, buffer: list[tuple[int, dict]]) -> list[dict]:
        batch = {name: [row.get(name) for _, row in buffer] for name in buffer[0][1]}
        labels = [f"{p} of rank {self.accelerator.process_index}'s stream" for p, _ in buffer]
        rows = self._recycle_rows(batch, labels)
        if not self._stream_passes_done:
            self._stream_recycled.extend(rows)
        return [features(*self._tokenize_recycled(row)) for row in rows if row["skip_reason"] is None]

    def _stream_pass_end(self, passes: int) -> None:
        self._stream_passes_done = passes
        if passes == 1:
            self._release_oracle("first pass over this rank's stream done")

    def _tokenize_original(self, dataset):
        """Evaluation data are scored as given, with the student's chat template and completion-only labels."""
        fmt = validate_rows(dataset, "error", self.reflection_config.max_field_chars).fmt

        def tokenize(row, idx):
            messages = pair_to_messages(row_to_pair(row, fmt, idx, self.reflection_config.max_field_chars))
            return features(*tokenize_conversation(self._tokenizer, messages[:-1], messages[-1:], self.args.max_length))

        return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names)

    # ---- results and logs ----------------------------------------------------------------------------------------
    def recycled_dataset(self):
        """The recycled training data in source order (what was trained on), ready for plain ``SFTTrainer``.

        Rows this process has not recycled (other ranks' shares) are read from the shared cache.
        """
        from datasets import Dataset

        if self._streaming:  # this rank's split, as recycled in the first pass
            return to_sft_dataset(Dataset.from_list(self._stream_recycled))
        self._materialize(list(range(len(self._source))))
        return to_sft_dataset(Dataset.from_list([self._recycled[i] for i in range(len(self._source))]))

    def recycling_stats(self) -> dict[str, float]:
        return self.recycler.stats()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        stats = self.recycler.stats()
        values = torch.tensor([float(stats.get(k, 0.0)) for k in _LOGGED_COUNTERS], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        summed = dict(zip(_LOGGED_COUNTERS, values.tolist()))
        for phase in ("instruction_reflection", "response_reflection"):
            if summed[f"{phase}/total"]:
                summed[f"{phase}/accept_rate"] = summed[f"{phase}/accepted"] / summed[f"{phase}/total"]
        if summed["oracle_seconds"]:
            summed["oracle_tokens_per_s"] = summed["oracle_tokens"] / summed["oracle_seconds"]
        logs.update({f"recycle/{k}": v for k, v in summed.items()})
        super().log(logs, start_time)
