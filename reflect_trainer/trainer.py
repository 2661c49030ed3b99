"""``ReflectionSFTTrainer``: ``trl.SFTTrainer`` that trains on the recycled data.

Drop-in means identical: everything that decides *what* is trained on is SFTTrainer's own code. ``SFTTrainer``
prepares the original training data as usual (so steps per epoch, the LR schedule, ``dataloader_drop_last``,
``train_sampling_strategy``, ``shuffle_dataset`` and the rows TRL drops are its own), and the Trainer's own sampler
and data loader draw from it. Each micro-batch then passes through a collator that swaps every row for its recycled
version, put back into the row in its own format and prepared by ``SFTTrainer._prepare_dataset``, lazily, one
generation buffer at a time (:mod:`.recycled_rows`; :mod:`.sampling` looks ahead in the Trainer's order). With an
oracle that changes nothing, training is token-for-token SFTTrainer's (``tests/test_parity.py``).

This module is wiring: the rows (:mod:`.recycled_rows`), the recycler (:mod:`.recycler`), where the oracle runs
(:mod:`.placement`), the trained-rows list of a resume (:mod:`.ledger`), and the TRL internals behind one checked
bridge (:mod:`.trl_bridge`).
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from .config import ReflectionConfig
from .exchange import training_format
from .formats import ALPACA
from .ledger import TrainOrder
from .oracles import Oracle
from .placement import overlap_wanted, placed_config
from .preflight import check_packing
from .recycled_rows import NOTHING, ORIGINAL, RECYCLED, ROW, RecycledRows, RecycledStream, index_source, trl_rows
from .recycler import Recycler
from .schema import LOGGED_COUNTERS, logged_counters
from .selection import recycler_with_student
from .trl_bridge import (TrainerHooks, as_sft_config, check_prepared_columns, check_signature_columns, check_trl,
                         last_complete_checkpoint, missing_row_id, prepare_rows, with_chat_template)

__all__ = ["ReflectionSFTTrainer", "ROW", "RECYCLED", "ORIGINAL", "NOTHING"]

logger = logging.getLogger(__name__)


class ReflectionSFTTrainer(TrainerHooks, SFTTrainer):
    """``SFTTrainer`` on data recycled by Reflection-Tuning, lazily, during epoch 1.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as for
            ``trl.SFTTrainer``, in every format it accepts (``messages``, ShareGPT ``conversations``,
            prompt–completion as strings or conversations, ``text``, ``formatting_func``, pre-tokenized
            ``input_ids``) plus Alpaca columns; see :mod:`.exchange` for what is reflected in each. ``args`` may
            be an ``SFTConfig`` or a ``TrainingArguments``; it is not modified.
            Bad rows of a map-style data set raise before any work, naming the row and field, or are left out
            (``reflection_config.on_bad_row``). ``eval_dataset`` is prepared and evaluated as SFTTrainer does (not
            recycled). ``packing=True`` is refused.
        reflection_config: The recycling settings; defaults to ``ReflectionConfig()`` (embedded SmolLM2 oracle).
        oracle: An already-built oracle, instead of one built from ``reflection_config``.
    """

    _tag_names = ["trl", "sft", "reflection-tuning"]
    extra_signature_columns = (ROW,)  # the Trainer must not prune the row id (trl_bridge.TrainerHooks)
    _name = "ReflectionSFT"
    _evaluating = False  # in evaluate(): its logs are SFTTrainer's
    in_evaluation_loop = False  # in evaluate() or predict(): batches are SFTTrainer's, with no row id

    def __init__(self, model, args: SFTConfig | TrainingArguments | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, *,
                 reflection_config: ReflectionConfig | None = None, oracle: Oracle | None = None, **kwargs):
        config = reflection_config or ReflectionConfig()
        config.check_before_training(train_dataset, args, oracle, kwargs)
        check_trl(type(self))  # the TRL/transformers internals we rely on are the tested ones (trl_bridge)
        from datasets import Dataset, IterableDataset

        if train_dataset is None:
            raise ValueError("ReflectionSFTTrainer needs a train_dataset to recycle")
        if not isinstance(train_dataset, (Dataset, IterableDataset)):
            raise TypeError(f"train_dataset must be a datasets.Dataset or IterableDataset, got {type(train_dataset)}")
        args = as_sft_config(args, model)
        check_packing(args)
        if args.dataloader_num_workers:
            # The collator calls the oracle and keeps the recycled rows: it must run in this process.
            logger.warning("ReflectionSFTTrainer collates in the main process; ignoring dataloader_num_workers=%d",
                           args.dataloader_num_workers)
            args.dataloader_num_workers, args.dataloader_persistent_workers = 0, False
            args.dataloader_prefetch_factor = None
        self._formatting_func = kwargs.get("formatting_func")
        fmt = training_format(next(iter(train_dataset)).keys(), args.dataset_text_field, self._formatting_func)
        # SFTTrainer has no Alpaca format: without a formatting_func, Alpaca rows train as prompt/completion.
        self._alpaca_conversation = fmt == ALPACA and self._formatting_func is None
        skipped, self.rows = [], None
        if isinstance(train_dataset, IterableDataset):
            self.rows = RecycledStream(fmt=fmt, alpaca_as_conversation=self._alpaca_conversation, config=config,
                                       ledger_dir=args.output_dir)
            buffer_rows = args.per_device_train_batch_size * config.buffer_batches * max(1, args.world_size)
            train_dataset = train_dataset.map(self.rows.transform, batched=True, batch_size=buffer_rows)
        else:
            source, reflectable, skipped = index_source(train_dataset, fmt, config.max_field_chars, config.on_bad_row)
            train_dataset = trl_rows(source, self._alpaca_conversation)
        if self._alpaca_conversation:
            processing_class = with_chat_template(model, args, processing_class)
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=trl_rows(eval_dataset, self._alpaca_conversation),
                         processing_class=processing_class, **kwargs)
        check_prepared_columns(self.train_dataset, ROW)
        check_signature_columns(self, ROW)
        self.data_collator = _RecyclingCollator(self.data_collator, self)
        self.reflection_config = config = placed_config(config, self.accelerator.device,
                                                        self.accelerator.is_local_main_process)
        streaming = isinstance(self.rows, RecycledStream)
        self._overlap = overlap_wanted(config.overlap, config.oracle_engine, config.oracle_device,
                                       self.accelerator.device, streaming)
        if not streaming:
            self.rows = RecycledRows(source, reflectable, self.train_dataset, self._prepare_rows, fmt=fmt,
                                     alpaca_as_conversation=self._alpaca_conversation, config=config,
                                     overlap=self._overlap, ledger_dir=self.args.output_dir)
        self._trained = TrainOrder(None if streaming else len(self.rows))  # rows trained, in first-trained order
        # Buffer settings for TRL's preparation of recycled rows: no shuffling or worker processes per buffer.
        self._buffer_args = copy.copy(self.args)
        self._buffer_args.shuffle_dataset, self._buffer_args.dataset_num_proc = False, None
        self.recycler = self._build_recycler(config, oracle)
        self.recycler.record_skipped(skipped)
        self.rows.recycler = self.recycler  # from here on, a stream's rows are recycled as TRL pulls them

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _model_is_sharded(self) -> bool:
        """ZeRO-3 and FSDP shard the student: its forward passes are collective, so all ranks must run them."""
        return self.is_fsdp_enabled or (self.is_deepspeed_enabled
                                        and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    def _build_recycler(self, config: ReflectionConfig, oracle: Oracle | None) -> Recycler:
        # the self-oracle and the scorer encode with the text tokenizer (a processor's ``tokenizer``)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        recycler = recycler_with_student(config, oracle, self.model, tokenizer,
                                         sharded=self._model_is_sharded(), max_length=self.args.max_length or 1024)
        if config.oracle_engine == "vllm" and self.accelerator.num_processes > 1:
            _ = recycler.oracle  # vLLM's external launcher sets up collectively: every rank builds it now
        return recycler

    def _prepare_rows(self, rows: list[dict]) -> dict:
        """Recycled rows prepared by SFTTrainer's own code, as :class:`.RecycledRows` asks (:func:`prepare_rows`)."""
        # Alpaca rows' prompt/completion columns were added after the source was read: their features are inferred.
        features = None if self._alpaca_conversation else self.rows.source.features
        return prepare_rows(self, rows, features, self._buffer_args, self._formatting_func, ROW)

    # ---- training: the Trainer's own loader, steps and checkpoints ------------------------------------------------
    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if isinstance(self.rows, RecycledRows):
            self.rows.lookahead.follow(loader)
        return loader

    def training_step(self, model, inputs, *args, **kwargs):
        # The loader collates one batch ahead of the step that takes it (and a run can stop in between): rows count
        # as trained here, not in the collator.
        for row in inputs.pop(ROW, ()):
            self._trained.add(row)
        return super().training_step(model, inputs, *args, **kwargs)

    def save_checkpoint_extras(self, folder: str) -> None:
        self._trained.save(folder, self.accelerator.process_index)  # before the checkpoint's barrier (trl_bridge)

    # Read here, not in a hook of the training loop: resumed from its last checkpoint (a run killed while it saved
    # the model or exported), the loop runs no epoch, and the export must still hold every row trained.
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:  # the newest *complete* one (the Trainer's pick may be a save killed midway)
            checkpoint = last_complete_checkpoint(self.args.output_dir)
        if checkpoint:
            self._trained.load(str(checkpoint), self.accelerator.process_index)
        return super().train(checkpoint, *args, **kwargs)

    # ---- evaluation: as SFTTrainer (eval data are not recycled) ------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = trl_rows(eval_dataset, self._alpaca_conversation)
        self._evaluating = True
        try:
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)
        finally:
            self._evaluating = False

    def evaluation_loop(self, *args, **kwargs):
        self.in_evaluation_loop = True
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self.in_evaluation_loop = False

    # ---- results and logs ----------------------------------------------------------------------------------------
    def recycled_dataset(self, include_dropped: bool = False):
        """Exactly the rows trained on (by any rank), in source order (streams: in the order first trained).

        Each row is in the training data's own format with the recycled texts in place, so plain ``SFTTrainer``
        with the same options trains on the same tokens; ``original_<column>`` keeps the input, the recycling
        columns say what the oracle did, ``trained_version`` is ``recycled``, ``original`` (nothing to reflect, or
        the recycled version had no trainable token within ``max_length``) or ``nothing`` (dropped by the selection
        rule; left out unless ``include_dropped``). Rows never trained on (``max_steps``, an early stop) are not
        here: :meth:`recycle_remaining` recycles them. Every rank must call this.
        """
        from datasets import Dataset

        return Dataset.from_list(self.rows.export(self._gathered_trained_rows(), include_dropped))

    def recycle_remaining(self, include_dropped: bool = False):
        """Recycle the rows never trained on (after ``max_steps`` or an early stop; may load the oracle) and return
        every row, trained or not, as :meth:`recycled_dataset` does; ``trained`` says which were."""
        from datasets import Dataset

        if isinstance(self.rows, RecycledStream):
            raise ValueError("a stream has no known remainder: recycle it with Recycler(...) over the stream")
        trained = set(self._gathered_trained_rows())
        self.rows.materialize(self.rows.missing())
        return Dataset.from_list(self.rows.export(list(range(len(self.rows))), include_dropped, add_trained=trained))

    def _gathered_trained_rows(self) -> list:
        rows = list(self._trained)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = list(dict.fromkeys(gather_object(rows)))
        return rows if isinstance(self.rows, RecycledStream) else sorted(rows)

    def recycling_stats(self) -> dict[str, float]:
        return {**self.recycler.stats(), **self.rows.counts}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._evaluating:
            return super().log(logs, start_time)  # evaluation metrics stay SFTTrainer's (evaluate() returns them)
        stats = self.recycling_stats()
        values = torch.tensor([float(stats.get(k, 0.0)) for k in LOGGED_COUNTERS], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        logs.update(logged_counters(values.tolist()))
        super().log(logs, start_time)


class _RecyclingCollator:
    """SFTTrainer's collator, fed each training row's recycled, TRL-prepared features (eval batches pass as is)."""

    def __init__(self, inner, trainer: ReflectionSFTTrainer):
        self.inner = inner
        self.trainer = trainer

    def __call__(self, features: list[dict]):
        if not features or ROW not in features[0]:
            if not self.trainer.in_evaluation_loop:
                raise missing_row_id(ROW)  # never train quietly on rows that were not recycled
            return self.inner(features)  # evaluation: SFTTrainer's batches, as they are
        rows = [f[ROW] for f in features]
        batch = self.inner(self.trainer.rows.features(rows, features))
        batch[ROW] = rows  # popped by training_step: a batch counts as trained when a step takes it
        return batch
