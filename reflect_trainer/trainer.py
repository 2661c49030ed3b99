"""``ReflectionSFTTrainer``: ``trl.SFTTrainer`` that trains on the recycled stream.

Swap the class name in a TRL script and epoch 1 recycles each pair through the oracle as its generation buffer is
first drawn; later epochs read the cache. Overridden hooks: ``get_train_dataloader`` (buffer sampler + recycling
collator) and ``log`` (recycling counters). Everything else is SFTTrainer's.

Threads: with ``overlap`` on, the oracle phases of the *next* buffer run in one background thread while the current
buffer trains. The recycler is never used by two threads at once: the next buffer is submitted only after the
current one is finished (selection, which needs the student, always runs in the training thread).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader
from trl import SFTConfig, SFTTrainer

from .chat import ensure_chat_template, features, tokenize_conversation
from .config import ReflectionConfig
from .export import recycled_conversation, to_sft_dataset
from .formats import ValidationReport, detect_format, pair_to_messages, row_to_pair, validate_rows
from .oracles import Oracle
from .recycler import Recycler
from .selection import StudentScorer
from .sampling import IndexDataset, RecycleBufferSampler
from .streaming import RecycledStream

logger = logging.getLogger(__name__)

# Counters summed over ranks for the Trainer's log.
_LOGGED_COUNTERS = (
    "rows_recycled", "rows_skipped", "cache_hits", "cache_misses", "oracle_calls", "oracle_prompts",
    "oracle_tokens", "oracle_seconds", "instruction_reflection/total", "instruction_reflection/parsed",
    "instruction_reflection/accepted", "response_reflection/total", "response_reflection/parsed",
    "response_reflection/accepted", "scores_computed", "selected/original", "selected/q", "selected/a",
    "selected/qa", "selected/dropped",
)


class ReflectionSFTTrainer(SFTTrainer):
    """``SFTTrainer`` on data recycled by Reflection-Tuning, lazily, during epoch 1.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as for
            ``trl.SFTTrainer``. ``train_dataset`` is in Alpaca, prompt–completion or ``messages`` format. A
            map-style ``datasets.Dataset`` is validated before anything else (bad rows raise naming the row, or are
            skipped, per ``reflection_config.on_bad_row``); a streamed ``IterableDataset`` (set ``max_steps``) is
            split by node and each row checked when its buffer is drawn. ``eval_dataset``, if given, is evaluated as
            is (not recycled).
        reflection_config: The recycling settings; defaults to ``ReflectionConfig()`` (embedded SmolLM2 oracle).
            ``mode="selective"`` lets this student score every version of a pair and train on the one the paper's
            rule picks; ``oracle_engine="self"`` makes the student's frozen base (PEFT students) the oracle.
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
        if config.oracle_engine == "self":
            oracle = self._self_oracle()
        scorer = None
        if config.mode == "selective":
            scorer = StudentScorer(self.model, self._tokenizer, batch_size=config.selection_batch_size,
                                   max_length=self.args.max_length or 1024, lockstep=self._model_is_sharded())
        self.recycler = Recycler(self.reflection_config, oracle=oracle, scorer=scorer)
        self.recycler.record_skipped(report.skipped.values())
        if config.oracle_engine == "vllm" and self.accelerator.num_processes > 1:
            _ = self.recycler.oracle  # vLLM's external launcher sets up collectively: every rank builds it now
        self._overlap = self._overlap_wanted()
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recycle") if self._overlap else None
        self._prefetched: dict[tuple, Future] = {}
        self._sampler: RecycleBufferSampler | None = None
        self._recycled: dict[int, dict] = {}  # source index -> recycled row
        self._tokens: dict[int, tuple] = {}  # source index -> (input_ids, completion_start)
        self._buffer_key: tuple | None = None
        self._rank_share: set[int] = set()
        self._stream_recycled: list[dict] = []  # streamed data: rows recycled in the first pass, in order
        self._stream_passes_done = 0
        if eval_dataset is not None:
            self.eval_dataset = self._tokenize_original(eval_dataset)

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _model_is_sharded(self) -> bool:
        """ZeRO-3 and FSDP shard the student: its forward passes are collective, so all ranks must run them."""
        if self.is_fsdp_enabled:
            return True
        return self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _self_oracle(self):
        from .oracles.self_oracle import SelfOracle

        if self._model_is_sharded():
            raise ValueError("oracle_engine='self' cannot generate with a sharded student (ZeRO-3/FSDP): ranks "
                             "generate out of step. Use ZeRO-2, or a separate oracle.")
        return SelfOracle(self.model, self._tokenizer, batch_size=self.reflection_config.oracle_batch_size)

    def _overlap_wanted(self) -> bool:
        """Overlap only pays when the oracle does not compete with the student for the same compute."""
        c = self.reflection_config
        if c.overlap != "auto" or c.oracle_engine == "self":
            if c.overlap == "on" and c.oracle_engine == "self":
                raise ValueError("overlap='on' cannot work with oracle_engine='self': the oracle is the student")
            return c.overlap == "on"
        if c.oracle_engine == "openai":
            return True  # a server: its own process, usually its own GPU
        return c.oracle_engine in ("transformers", "llama_cpp") and c.oracle_device != str(self.accelerator.device)

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
        self._sampler = sampler
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
        # Rows the selection rule dropped train on nothing; a micro-batch left empty gets one fully masked token
        # (TRL's loss is finite for a batch without trainable tokens).
        micro = [features(*self._tokens[i]) for i in indices[k * size : (k + 1) * size] if self._tokens[i] is not None]
        return self.data_collator(micro or [self._nothing_to_learn()])

    def _nothing_to_learn(self) -> dict:
        return features(np.asarray([self._tokenizer.eos_token_id]), completion_start=1)

    def _materialize(self, indices: list[int]) -> None:
        """Recycle (one oracle call per template step for all misses) and tokenize the rows not yet seen."""
        todo = sorted({i for i in indices if i not in self._tokens})
        pending = self._prefetched.pop(tuple(todo), None)
        for stale in self._prefetched.values():  # never two threads in the recycler (its results are cached)
            stale.result()
        self._prefetched.clear()
        if todo:
            reflected = pending.result() if pending is not None else self.recycler.reflect(self._source[todo], todo)
            for i, row in zip(todo, self._rows(self.recycler.finish(reflected), len(todo))):
                self._recycled[i] = row
                self._tokens[i] = self._tokenize_recycled(row) if row["skip_reason"] is None else None
        elif self.recycler.scorer is not None and self.recycler.scorer.lockstep:
            self.recycler.scorer.score([])  # sharded student: peers with rows to score wait for this rank
        if self._rank_share <= self._tokens.keys():
            self._release_oracle("every pair of this rank's share is recycled")
        elif self._prefetcher is not None:
            self._prefetch_after(indices)

    def _prefetch_after(self, indices: list[int]) -> None:
        """Start the oracle phases of this rank's next buffer in the background (``overlap``)."""
        slices = self._sampler.rank_slices(self._sampler.epoch, self.accelerator.process_index)
        try:
            following = slices[slices.index(list(indices)) + 1]
        except (ValueError, IndexError):
            return  # the last buffer of the epoch, or a slice of another epoch's order
        todo = sorted({i for i in following if i not in self._tokens})
        if todo and tuple(todo) not in self._prefetched:
            self._prefetched[tuple(todo)] = self._prefetcher.submit(self.recycler.reflect, self._source[todo], todo)

    def _recycle_rows(self, batch: dict[str, list], indices: list) -> list[dict]:
        """Run the recycling transform on a batch; return one recycled row (dict) per input row."""
        return self._rows(self.recycler(batch, indices=indices), len(indices))

    @staticmethod
    def _rows(columns: dict[str, list], n: int) -> list[dict]:
        return [{name: values[j] for name, values in columns.items()} for j in range(n)]

    def _tokenize_recycled(self, row: dict) -> tuple:
        prompt, completion = recycled_conversation(row, self._fmt)
        return tokenize_conversation(self._tokenizer, prompt, completion, self.args.max_length)

    def _release_oracle(self, why: str) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
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
        kept = [features(*self._tokenize_recycled(row)) for row in rows if row["skip_reason"] is None]
        return kept or [self._nothing_to_learn()]

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
    def recycled_dataset(self, include_dropped: bool = False):
        """The recycled training data in source order (what was trained on), ready for plain ``SFTTrainer``.

        Rows this process has not recycled (other ranks' shares) are read from the shared cache; every rank must
        call this (with a sharded student, scoring a row is collective). In selective mode every row carries its
        scores and ``selected_version``; rows the rule dropped are left out unless ``include_dropped``.
        """
        from datasets import Dataset

        if self._streaming:  # this rank's split, as recycled in the first pass
            return to_sft_dataset(Dataset.from_list(self._stream_recycled), keep_dropped=include_dropped)
        self._materialize(list(range(len(self._source))))
        rows = [self._recycled[i] for i in range(len(self._source))]
        return to_sft_dataset(Dataset.from_list(rows), keep_dropped=include_dropped)

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
