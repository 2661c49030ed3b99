"""``ReflectionSFTTrainer``: ``trl.SFTTrainer`` that trains on the recycled data.

Drop-in means identical: everything that decides *what* is trained on is SFTTrainer's own code. ``SFTTrainer``
prepares the original training data as usual (so steps per epoch, the LR schedule, ``dataloader_drop_last``,
``train_sampling_strategy``, ``shuffle_dataset`` and the rows TRL drops are its own), and the Trainer's own sampler
and data loader draw from it. Each micro-batch then passes through a collator that swaps every row for its recycled
version: the recycled texts are put back into the row in its own format (:mod:`.exchange`) and those rows go through
``SFTTrainer._prepare_dataset`` (chat template, ``tools``, ``formatting_func``, ``dataset_text_field``,
``completion_only_loss``, ``assistant_only_loss``, ``max_length``/``truncation_mode``), lazily, one generation buffer
at a time (:mod:`.sampling` looks ahead in the Trainer's order). With an oracle that changes nothing, training is
token-for-token SFTTrainer's (``tests/test_parity.py``).

Streams (``IterableDataset``) get the recycling transform in front of TRL's lazy preparation (``.map``), so accelerate
shards them, reshuffles them per pass and keeps ranks in step exactly as for SFTTrainer.

Memory: what a rank remembers per row for the export and a resume (the features each row trained on, the exported
row) is written to a per-rank anonymous file as it is produced (:mod:`.ledger`); in memory stay a few numpy arrays of
a few bytes a row, so a rank's memory does not grow with the rows it trains. A row's exchange is recomputed from the
source when the oracle needs it.

Threads: with ``overlap`` on, the oracle phases of the *next* buffer run in one background thread while the current
buffer trains; the recycler is never used by two threads at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from .chat import ensure_chat_template
from .config import ReflectionConfig
from .exchange import alpaca_conversation, exchange, training_format, with_recycled
from .export import DROPPED_BY_SELECTION
from .formats import ALPACA, BadRowError
from .ledger import RowLedger, TrainOrder
from .oracles import Oracle, resolve_engine
from .recycler import Recycler
from .sampling import loader_sampler, rank_batches, record_order
from .trl_bridge import (TrainerHooks, check_prepared_columns, check_signature_columns, check_trl, missing_row_id,
                         prepare_buffer)
from .schema import oracle_tokens_per_s
from .selection import StudentScorer

logger = logging.getLogger(__name__)

ROW = "_reflect_row"  # column that carries a row's identity through TRL's preparation to the collator

# Counters summed over ranks for the Trainer's log.
_LOGGED_COUNTERS = (
    "rows_recycled", "rows_skipped", "rows_passed_through", "rows_fully_masked_fallback", "rows_dropped_by_trl",
    "cache_hits", "cache_misses", "claims_taken_over", "cache_leases_lost",  # (duplicates: per rank, in the stats)
    "oracle_calls", "oracle_prompts", "oracle_tokens", "oracle_seconds",
    "instruction_reflection/total", "instruction_reflection/parsed", "instruction_reflection/accepted",
    "response_reflection/total", "response_reflection/parsed", "response_reflection/accepted", "scores_computed",
    "selected/original", "selected/q", "selected/a", "selected/qa", "selected/dropped",
)
# What a row was trained on (export column ``trained_version``).
RECYCLED, ORIGINAL, NOTHING = "recycled", "original", "nothing"


def _as_sft_config(args, model) -> SFTConfig:
    """The config SFTTrainer would use, never the user's object itself (it must stay reusable for a baseline)."""
    if args is None:
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return SFTConfig(f"{name.split('/')[-1]}-SFT")
    if isinstance(args, TrainingArguments) and not isinstance(args, SFTConfig):
        dict_args = args.to_dict()  # the conversion SFTTrainer does
        dict_args["hub_token"] = args.hub_token
        return SFTConfig(**dict_args)
    return copy.copy(args)


def _row_key(row: dict) -> str:
    """A streamed row's identity: the hash of its content (positions change when a stream is reshuffled)."""
    return hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _device(device) -> tuple[str, int]:
    """A device as (type, index): "cuda" is the current CUDA device, so "cuda" and "cuda:0" compare equal on GPU 0."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):  # not a torch device string (e.g. a device_map name): compared as written
        return str(device), -1
    if d.index is not None:
        return d.type, d.index
    return d.type, torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0


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
    _in_evaluation_loop = False  # in evaluate() or predict(): batches are SFTTrainer's, with no row id

    def __init__(self, model, args: SFTConfig | TrainingArguments | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, *,
                 reflection_config: ReflectionConfig | None = None, oracle: Oracle | None = None, **kwargs):
        (reflection_config or ReflectionConfig()).check_before_training(train_dataset, args, oracle, kwargs)
        check_trl(type(self))  # the TRL/transformers internals we rely on are the tested ones (trl_bridge)
        from datasets import Dataset, IterableDataset

        if train_dataset is None:
            raise ValueError("ReflectionSFTTrainer needs a train_dataset to recycle")
        if not isinstance(train_dataset, (Dataset, IterableDataset)):
            raise TypeError(f"train_dataset must be a datasets.Dataset or IterableDataset, got {type(train_dataset)}")
        config = reflection_config or ReflectionConfig()
        args = _as_sft_config(args, model)
        if args.packing:
            raise ValueError(
                "packing=True cannot work with lazy recycling: a packed sequence is cut from many rows before training "
                "starts, but a row's recycled length is only known when its buffer is recycled. Train with "
                "packing=False (padding_free=True also saves the padding), or recycle first "
                "(`reflect-trainer recycle`) and pack the export with plain SFTTrainer."
            )
        if args.dataloader_num_workers:
            # The collator calls the oracle and keeps the recycled rows: it must run in this process.
            logger.warning("ReflectionSFTTrainer collates in the main process; ignoring dataloader_num_workers=%d",
                           args.dataloader_num_workers)
            args.dataloader_num_workers, args.dataloader_persistent_workers = 0, False
            args.dataloader_prefetch_factor = None
        self._formatting_func = kwargs.get("formatting_func")
        self._streaming = isinstance(train_dataset, IterableDataset)
        first = next(iter(train_dataset))
        self._fmt = training_format(first.keys(), args.dataset_text_field, self._formatting_func)
        # SFTTrainer has no Alpaca format: without a formatting_func, Alpaca rows train as prompt/completion.
        self._alpaca_conversation = self._fmt == ALPACA and self._formatting_func is None
        self._skipped: list[BadRowError] = []
        self._live = False  # streams: the recycling transform passes rows through until training starts
        if self._streaming:
            self._source = train_dataset
            buffer_rows = args.per_device_train_batch_size * config.buffer_batches * max(1, args.world_size)
            train_dataset = train_dataset.map(self._recycle_stream_rows, batched=True, batch_size=buffer_rows)
        else:
            train_dataset = self._indexed_source(train_dataset, config)
        if self._alpaca_conversation:
            if processing_class is None:  # loaded as SFTTrainer would, to give a base model a template first
                from transformers import AutoProcessor
                from trl.trainer.utils import get_config_model_id

                name = model if isinstance(model, str) else get_config_model_id(model.config)
                processing_class = AutoProcessor.from_pretrained(name, trust_remote_code=args.trust_remote_code)
            ensure_chat_template(getattr(processing_class, "tokenizer", processing_class))
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=self._trl_rows(eval_dataset), processing_class=processing_class, **kwargs)
        check_prepared_columns(self.train_dataset, ROW)
        check_signature_columns(self, ROW)
        self.data_collator = _RecyclingCollator(self.data_collator, self)
        device = config.oracle_device
        if device is None and self.accelerator.device.type == "cuda":
            device = str(self.accelerator.device)
        self.reflection_config = copy.copy(config)
        self.reflection_config.oracle_device = device or "cpu"
        self.reflection_config.progress_bar = config.progress_bar and self.accelerator.is_local_main_process
        self.reflection_config.oracle_engine, why = resolve_engine(
            config.oracle_engine, config.oracle_model_path, self.reflection_config.oracle_device,
            config.oracle_base_url)
        if config.oracle_engine == "auto":
            logger.info("oracle engine: %s (%s)", self.reflection_config.oracle_engine, why)
        config = self.reflection_config
        if config.oracle_engine == "self":
            oracle = self._self_oracle()
        scorer = None
        if config.mode == "selective":
            scorer = StudentScorer(self.model, self._text_tokenizer(), batch_size=config.selection_batch_size,
                                   max_length=self.args.max_length or 1024, lockstep=self._model_is_sharded())
        self.recycler = Recycler(self.reflection_config, oracle=oracle, scorer=scorer)
        self.recycler.record_skipped(self._skipped)
        if config.oracle_engine == "vllm" and self.accelerator.num_processes > 1:
            _ = self.recycler.oracle  # vLLM's external launcher sets up collectively: every rank builds it now
        self._overlap = self._overlap_wanted()
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recycle") if self._overlap else None
        self._prefetched: dict[tuple, Future] = {}
        self._counts = {"rows_passed_through": 0, "rows_fully_masked_fallback": 0, "rows_dropped_by_trl": 0}
        # The ledger: what this rank remembers per row for the export and a resume, on disk (:mod:`.ledger`), so
        # that its memory does not grow with the rows it trains. Map-style rows are keyed by position (numpy arrays
        # of a fixed size); streamed rows by their content hash (a small dict entry each).
        n_rows = None if self._streaming else len(self._source)
        self._prepared = RowLedger(n_rows, self.args.output_dir)  # row -> features trained on (None: the original,
        #                                                         as SFTTrainer prepared it)
        self._exported = RowLedger(n_rows, self.args.output_dir)  # row -> export row (the row as trained on, the
        #                                                         original, the recycling columns; None: a bad row)
        self._trained = TrainOrder(n_rows)  # the rows trained, in the order first trained
        # Buffer settings for TRL's preparation of recycled rows: no shuffling or worker processes per buffer.
        self._buffer_args = copy.copy(self.args)
        self._buffer_args.shuffle_dataset, self._buffer_args.dataset_num_proc = False, None
        self._loader_batches = None  # (batch sampler, sampler) of the training data loader, for the look-ahead
        # This rank's micro-batches (source rows) of the current epoch, flat: (rows, start of each batch and the end).
        self._batches: tuple[np.ndarray, np.ndarray] | None = None
        self._batches_of = None  # the recorded order they were replayed from
        self._share_left = np.zeros(0 if n_rows is None else n_rows, dtype=bool)  # rows of those not recycled yet
        self._share_count = 0  # how many
        self._cursor = 0
        if not self._streaming:
            # The prepared dataset: position -> source row (after TRL's filtering), and back (-1: TRL dropped it).
            rows = np.asarray(self.train_dataset[ROW], dtype=np.int64)
            self._position_row = rows
            self._row_position = np.full(n_rows, -1, dtype=np.int64)
            self._row_position[rows] = np.arange(len(rows), dtype=np.int64)
            # Rows SFTTrainer's preparation dropped (no trainable token within max_length): as in SFTTrainer, but
            # counted.
            self._counts["rows_dropped_by_trl"] = len(self._source) - len(rows)
        self._live = True

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _indexed_source(self, dataset, config: ReflectionConfig):
        """Validate the reflectable exchanges (bad data surfaces before any model or oracle work), tag each row
        with its identity, and turn Alpaca rows into what SFTTrainer can train on.

        Only whether a row has an exchange is kept (a bool a row): :meth:`_pair` computes it again when needed."""
        self._max_field_chars = config.max_field_chars
        reflectable = []
        keep = []
        for i, row in enumerate(dataset):
            try:
                reflectable.append(exchange(row, self._fmt, i, config.max_field_chars) is not None)
                keep.append(i)
            except BadRowError as err:
                if config.on_bad_row == "error":
                    raise
                logger.warning("skipping bad row: %s", err)
                self._skipped.append(err)
        if self._skipped:
            logger.warning("left out %d of %d rows as bad input", len(self._skipped), len(dataset))
            dataset = dataset.select(keep)
        self._reflectable = np.array(reflectable, dtype=bool)
        if not self._reflectable.any():
            logger.warning("no row has an instruction/response exchange to reflect: training on the data as given")
        self._source = dataset.add_column(ROW, list(range(len(dataset))))
        return self._trl_rows(self._source)

    def _trl_rows(self, dataset):
        """Alpaca rows (no formatting_func) as conversational prompt/completion; other formats as given."""
        if dataset is None or not self._alpaca_conversation:
            return dataset
        if isinstance(dataset, dict):
            return type(dataset)({k: self._trl_rows(v) for k, v in dataset.items()})
        if "prompt" in (dataset.column_names or ()):
            return dataset
        return dataset.map(lambda r: alpaca_conversation(r["instruction"], r.get("input") or "", r["output"]))

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
        return SelfOracle(self.model, self._text_tokenizer(), batch_size=self.reflection_config.oracle_batch_size)

    def _overlap_wanted(self) -> bool:
        """Overlap only pays when the oracle does not compete with the student for the same compute."""
        c = self.reflection_config
        if c.overlap != "auto" or c.oracle_engine == "self":
            if c.overlap == "on" and c.oracle_engine == "self":
                raise ValueError("overlap='on' cannot work with oracle_engine='self': the oracle is the student")
            return c.overlap == "on" and not self._streaming
        if self._streaming:
            return False
        if c.oracle_engine == "openai":
            return True  # a server: its own process, usually its own GPU
        return c.oracle_engine in ("transformers", "llama_cpp") and _device(c.oracle_device) != _device(
            self.accelerator.device)

    def _text_tokenizer(self):
        """``processing_class``, or a processor's ``tokenizer``: what the self-oracle and the scorer encode with."""
        return getattr(self.processing_class, "tokenizer", self.processing_class)

    # ---- data: the Trainer's own loader, with a look-ahead into its order ------------------------------------
    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        if not self._streaming:
            batch_sampler, sampler = loader_sampler(loader)
            self._loader_batches = (batch_sampler, sampler) if record_order(sampler) else None
            self._batches = self._batches_of = None
        return loader

    def _epoch_batches(self) -> int | None:
        """How many micro-batches this rank has in the current pass, replayed from the recorded order (``None``: no
        look-ahead); :meth:`_batch_rows` gives their rows."""
        if self._loader_batches is None:
            return None
        batch_sampler, sampler = self._loader_batches
        order = getattr(sampler, "recorded_order", None)
        if order is not None and self._batches_of is not order:
            positions = rank_batches(batch_sampler, order)
            self._batches = None
            self._share_left[:] = False
            if positions is not None:
                starts = np.zeros(len(positions) + 1, dtype=np.int64)
                np.cumsum([len(b) for b in positions], out=starts[1:])
                flat = np.fromiter((p for b in positions for p in b), dtype=np.int64, count=int(starts[-1]))
                self._batches = (self._position_row[flat], starts)
                self._share_left[self._batches[0]] = True
                self._share_left &= ~self._prepared.present()
            self._share_count = int(self._share_left.sum())
            self._batches_of, self._cursor = order, 0
            if self.recycler.expected_rows is None and self._share_count:
                self.recycler.expected_rows = self._share_count  # the progress bar's total, with an ETA
        if order is None or self._batches is None:
            return None
        return len(self._batches[1]) - 1

    def _batch_rows(self, first: int, end: int) -> list:
        """The source rows of this rank's micro-batches ``first..end-1`` of the current pass (clipped to the pass)."""
        rows, starts = self._batches
        n = len(starts) - 1
        return rows[starts[min(first, n)] : starts[min(end, n)]].tolist()

    def _features_for(self, rows: list, features: list[dict]) -> list[dict]:
        """The collator's hook: the recycled, TRL-prepared features of a micro-batch's rows.

        Buffers are aligned on this rank's micro-batches (``0..buffer_batches-1``, then the next ones...), and every
        rank materializes at every buffer start, with or without rows to recycle: with a sharded student (ZeRO-3)
        selective scoring is collective, so all ranks must make the same calls.
        """
        batches, size = self._epoch_batches(), self.reflection_config.buffer_batches
        t = None
        if batches:
            t = next((i for i in range(self._cursor, batches) if self._batch_rows(i, i + 1) == rows), None)
        if t is None:  # no look-ahead (unknown sampler): recycle this micro-batch on its own
            buffer, following, boundary = rows, [], True
        else:
            self._cursor = t + 1
            start = t - t % size
            buffer = self._batch_rows(start, start + size)
            following = self._batch_rows(start + size, start + 2 * size)
            boundary = t == start
        if boundary or any(r not in self._prepared for r in rows):
            self._materialize([r for r in dict.fromkeys([*rows, *buffer]) if r not in self._prepared])
            self._prefetch([r for r in dict.fromkeys(following) if r not in self._prepared])
        out = []
        for row, feature in zip(rows, features):
            prepared = self._prepared[row]
            out.append(prepared if prepared is not None else {k: feature[k] for k in ("input_ids", "labels")})
        if batches and not self._share_count:
            self._release_oracle("every row of this rank's share is recycled")
        return out

    def _materialize(self, rows: list) -> None:
        """Recycle (one oracle call per template step for all misses) and prepare ``rows`` with TRL's code."""
        reflect = [r for r in rows if self._reflectable[r]]
        pending = self._prefetched.pop(tuple(reflect), None)
        for stale in self._prefetched.values():  # never two threads in the recycler (its results are cached)
            stale.result()
        self._prefetched.clear()
        recycled = {}
        if reflect:
            reflected = pending.result() if pending is not None else self._reflect(reflect)
            columns = self.recycler.finish(reflected)
            for j, r in enumerate(reflect):
                recycled[r] = {name: columns[name][j] for name in self.recycler.columns}
        elif self.recycler.scorer is not None and self.recycler.scorer.lockstep:
            self.recycler.scorer.score([])
        sources = {r: self._source[r] for r in rows}
        trained_rows, versions = [], {}
        for r in rows:
            rec = recycled.get(r)
            if rec is None:
                self._counts["rows_passed_through"] += 1
                versions[r] = ORIGINAL
                continue
            versions[r] = NOTHING if rec["skip_reason"] == DROPPED_BY_SELECTION else RECYCLED
            if versions[r] == RECYCLED:
                trained_rows.append(with_recycled(sources[r], self._fmt, rec["recycled_instruction"],
                                                  rec["recycled_input"], rec["recycled_output"],
                                                  self._alpaca_conversation))
        prepared = self._prepare_rows(trained_rows)
        for r in rows:
            if versions[r] == RECYCLED and r not in prepared:
                # TRL drops a row left without a trainable token (e.g. the recycled prompt fills max_length); the
                # original survived SFTTrainer's preparation, so the step trains on it rather than on nothing.
                versions[r] = ORIGINAL
                self._counts["rows_fully_masked_fallback"] += 1
            if versions[r] == RECYCLED:
                self._prepared[r] = prepared[r]
            elif versions[r] == NOTHING:  # the selection rule dropped it: the step keeps its slot, with no loss
                original = self.train_dataset[int(self._row_position[r])]
                self._prepared[r] = {"input_ids": original["input_ids"], "labels": [-100] * len(original["labels"])}
            else:
                self._prepared[r] = None
            self._exported[r] = self._export_row(sources[r], recycled.get(r), versions[r])
            if self._share_left[r]:
                self._share_left[r] = False
                self._share_count -= 1

    def _reflect(self, rows: list):
        """The oracle phases for ``rows`` (safe in the background thread): their exchanges as Alpaca pairs."""
        pairs = [self._pair(r) for r in rows]
        batch = {"instruction": [p.instruction for p in pairs], "input": [p.input for p in pairs],
                 "output": [p.output for p in pairs]}
        return self.recycler.reflect(batch, list(rows))

    def _pair(self, row: int):
        """Row ``row``'s exchange, computed again from the source (validated at set-up, so it cannot raise)."""
        return exchange(self._source[row], self._fmt, row, self._max_field_chars)

    def _prefetch(self, rows: list) -> None:
        """Start the oracle phases of this rank's next buffer in the background (``overlap``)."""
        reflect = tuple(r for r in rows if self._reflectable[r])
        if self._prefetcher is not None and reflect and reflect not in self._prefetched:
            self._prefetched[reflect] = self._prefetcher.submit(self._reflect, list(reflect))

    def _prepare_rows(self, rows: list[dict]) -> dict:
        """``row -> {input_ids, labels}`` for rows in the user's format, by SFTTrainer's own preparation; rows TRL
        drops (no trainable token left) are absent."""
        if not rows:
            return {}
        from datasets import Dataset

        features = self._source.features
        if self._alpaca_conversation:
            features = None  # the prompt/completion columns were added after the source was read
        data = Dataset.from_list(rows, features=features)
        prepared = prepare_buffer(self, data, self._buffer_args, self._formatting_func)
        return {r[ROW]: {"input_ids": r["input_ids"], "labels": r["labels"]}
                for r in prepared.select_columns([ROW, "input_ids", "labels"])}

    def _export_row(self, source: dict, recycled: dict | None, version: str) -> dict:
        """The row as trained on (in the user's format), its original format columns, and the recycling columns."""
        source = {k: v for k, v in source.items() if k != ROW}
        if self._alpaca_conversation:
            source.update(alpaca_conversation(source["instruction"], source.get("input") or "", source["output"]))
        trained = source
        if version == RECYCLED:
            trained = with_recycled(source, self._fmt, recycled["recycled_instruction"], recycled["recycled_input"],
                                    recycled["recycled_output"], self._alpaca_conversation)
        row = dict(trained)
        for name in ("instruction", "input", "output", "prompt", "completion", "messages", "conversations"):
            if name in source:
                row[f"original_{name}"] = source[name]
        row.update(recycled or dict.fromkeys(self.recycler.columns))
        row["trained_version"] = version
        return row

    def _release_oracle(self, why: str) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
        if self.reflection_config.release_oracle and self.recycler.oracle_loaded:
            logger.info("%s: releasing the oracle", why)
            self.recycler.release_oracle()
            self.recycler.close_progress()

    def training_step(self, model, inputs, *args, **kwargs):
        # The loader collates one batch ahead of the step that takes it (and a run can stop in between): rows count
        # as trained here, not in the collator.
        for row in inputs.pop(ROW, ()):
            self._trained.add(row)
        return super().training_step(model, inputs, *args, **kwargs)

    # A resumed run's export must still hold the rows trained before the checkpoint: each rank saves its list. Every
    # rank's list is on disk (written whole: temporary file, then rename) before the Trainer writes
    # trainer_state.json, its last file: a checkpoint a kill -9 left with a trainer state has every list.
    def save_checkpoint_extras(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"reflect_trained-{self.accelerator.process_index}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(list(self._trained), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self.accelerator.wait_for_everyone()

    # Read here, not in a hook of the training loop: resumed from its last checkpoint (a run killed while it saved
    # the model or exported), the loop runs no epoch, and the export must still hold every row trained.
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        path = os.path.join(str(checkpoint), f"reflect_trained-{self.accelerator.process_index}.json")
        if checkpoint and os.path.isfile(path):
            with open(path) as f:
                for row in json.load(f):
                    self._trained.add(row)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- streamed data ---------------------------------------------------------------------------------------
    def _recycle_stream_rows(self, batch: dict[str, list]) -> dict[str, list]:
        """The transform in front of TRL's lazy preparation: each buffer of the stream, recycled in one call.

        Every rank reads the whole stream and accelerate keeps its share (as for SFTTrainer: equal step counts on
        every rank, no hang at a partial accumulation step). Each rank therefore runs the recycler on every row; the
        shared cache's claims make each pair go to the oracle once, and later passes read the cache.
        """
        n = len(next(iter(batch.values())))
        rows = [{k: batch[k][j] for k in batch} for j in range(n)]
        keys = [_row_key(r) for r in rows]
        if self._alpaca_conversation:
            rows = [{**r, **alpaca_conversation(r["instruction"], r.get("input") or "", r["output"])} for r in rows]
        out = [{**r, ROW: k} for r, k in zip(rows, keys)]
        if self._live:
            out = self._recycle_stream_buffer(out)
        return {name: [r[name] for r in out] for name in (out[0] if out else {**batch, ROW: None})}

    def _recycle_stream_buffer(self, rows: list[dict]) -> list[dict]:
        c = self.reflection_config
        fresh = [r for r in rows if r[ROW] not in self._exported]
        if not fresh:
            self._release_oracle("a pass over the stream is done")
        todo, pairs = [], []
        for r in fresh:
            try:
                pair = exchange(r, self._fmt, f"{r[ROW]} of the stream", c.max_field_chars)
            except BadRowError as err:
                if c.on_bad_row == "error":
                    raise
                logger.warning("skipping bad row: %s", err)
                self.recycler.record_skipped([err])
                self._exported[r[ROW]] = None
                continue
            if pair is None:
                self._counts["rows_passed_through"] += 1
                self._exported[r[ROW]] = self._export_row(r, None, ORIGINAL)
            else:
                todo.append(r)
                pairs.append(pair)
        if todo:
            batch = {"instruction": [p.instruction for p in pairs], "input": [p.input for p in pairs],
                     "output": [p.output for p in pairs]}
            columns = self.recycler.finish(self.recycler.reflect(batch, [r[ROW] for r in todo]))
            for j, r in enumerate(todo):
                rec = {name: columns[name][j] for name in self.recycler.columns}
                version = NOTHING if rec["skip_reason"] == DROPPED_BY_SELECTION else RECYCLED
                self._exported[r[ROW]] = self._export_row(r, rec, version)
        out = []
        for r in rows:
            exported = self._exported[r[ROW]]
            if exported is None:
                continue  # a bad row, left out (on_bad_row="skip")
            if exported["trained_version"] == RECYCLED:
                r = with_recycled(r, self._fmt, exported["recycled_instruction"], exported["recycled_input"],
                                  exported["recycled_output"], self._alpaca_conversation)
            out.append(r)
        return out

    def _stream_features(self, rows: list, features: list[dict]) -> list[dict]:
        """Streams arrive recycled and prepared; rows dropped by the selection rule train on nothing."""
        out = []
        for row, feature in zip(rows, features):
            feature = {k: feature[k] for k in ("input_ids", "labels")}
            exported = self._exported.get(row)
            if exported is not None and exported["trained_version"] == NOTHING:
                feature["labels"] = [-100] * len(feature["labels"])
            out.append(feature)
        return out

    # ---- evaluation: as SFTTrainer (eval data are not recycled) ------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._trl_rows(eval_dataset)
        self._evaluating = True
        try:
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)
        finally:
            self._evaluating = False

    def evaluation_loop(self, *args, **kwargs):
        self._in_evaluation_loop = True
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self._in_evaluation_loop = False

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
        return self._export(self._gather_rows(list(self._trained)), include_dropped)

    def recycle_remaining(self, include_dropped: bool = False):
        """Recycle the rows never trained on (after ``max_steps`` or an early stop; may load the oracle) and return
        every row, trained or not, as :meth:`recycled_dataset` does; ``trained`` says which were."""
        if self._streaming:
            raise ValueError("a stream has no known remainder: recycle it with Recycler(...) over the stream")
        trained = set(self._gather_rows(list(self._trained)))
        self._materialize(self._prepared.missing())
        data = self._export(list(range(len(self._source))), include_dropped, add_trained=trained)
        return data

    def _gather_rows(self, rows: list) -> list:
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = list(dict.fromkeys(gather_object(rows)))
        return sorted(rows) if not self._streaming else rows

    def _export(self, rows: list, include_dropped: bool, add_trained: set | None = None):
        from datasets import Dataset

        if self._streaming:
            missing = [r for r in rows if r not in self._exported]
            if missing:  # trained by another rank that recycled it: every rank recycles every streamed row
                raise RuntimeError(f"{len(missing)} trained rows were never recycled on this rank")
        else:
            self._materialize([r for r in rows if r not in self._prepared])  # other ranks' rows: from the cache
        out = []
        for r in rows:
            row = self._exported[r]
            if row is None or (row["trained_version"] == NOTHING and not include_dropped):
                continue
            out.append({**row, "trained": r in add_trained} if add_trained is not None else row)
        return Dataset.from_list(out)

    def recycling_stats(self) -> dict[str, float]:
        return {**self.recycler.stats(), **self._counts}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._evaluating:
            return super().log(logs, start_time)  # evaluation metrics stay SFTTrainer's (evaluate() returns them)
        stats = self.recycling_stats()
        values = torch.tensor([float(stats.get(k, 0.0)) for k in _LOGGED_COUNTERS], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        summed = dict(zip(_LOGGED_COUNTERS, values.tolist()))
        for phase in ("instruction_reflection", "response_reflection"):
            if summed[f"{phase}/total"]:
                summed[f"{phase}/accept_rate"] = summed[f"{phase}/accepted"] / summed[f"{phase}/total"]
        summed["oracle_tokens_per_s"] = oracle_tokens_per_s(summed)
        logs.update({f"recycle/{k}": v for k, v in summed.items()})
        super().log(logs, start_time)


class _RecyclingCollator:
    """SFTTrainer's collator, fed each training row's recycled, TRL-prepared features (eval batches pass as is)."""

    def __init__(self, inner, trainer: ReflectionSFTTrainer):
        self.inner = inner
        self.trainer = trainer

    def __call__(self, features: list[dict]):
        if not features or ROW not in features[0]:
            if not self.trainer._in_evaluation_loop:
                raise missing_row_id(ROW)  # never train quietly on rows that were not recycled
            return self.inner(features)  # evaluation: SFTTrainer's batches, as they are
        rows = [f[ROW] for f in features]
        t = self.trainer
        features = t._stream_features(rows, features) if t._streaming else t._features_for(rows, features)
        batch = self.inner(features)
        batch[ROW] = rows  # popped by training_step: a batch counts as trained when a step takes it
        return batch
