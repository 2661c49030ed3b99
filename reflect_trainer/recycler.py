"""The recycling engine: a ``datasets`` transform that runs the reflection phases through the oracle, batch by batch,
serving cache hits and sending every miss of a batch to the oracle in one call.

Use it on its own::

    recycler = Recycler(ReflectionConfig(cache_dir="cache"))
    recycled = ds.with_transform(recycler)                       # lazy, map-style
    recycled = iterable_ds.map(recycler, batched=True)           # lazy, streaming
    recycled = recycler.recycle_dataset(ds)                      # eager, with validation and a progress bar
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from .cache import RecycleCache, cache_key
from .config import ReflectionConfig
from .formats import BadRowError, Pair, read_row, row_format, validate_rows
from .oracles import Oracle, load_oracle, oracle_identity, resolve_quantization
from .oracles.decoding import resolve_controls
from .parsing import has_marker_like_text
from .phase import PhaseOutcome, PhaseRunner
from .recycling_stats import RecycleProgress, RecycleStats, log_summary
from .schema import (DROPPED_BY_SELECTION, PASSED_THROUGH, RECYCLED_COLUMNS,  # noqa: F401 (public names)
                     RESPONSE_REFLECTION_OF_ORIGINAL, SELECTION_COLUMNS, VERSIONS, fallback_column, finish_column,
                     raw_column)
from .selection import SCORING_VERSION, PairScores, select_version
from .templates import (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION, TEMPLATE_SETS, ReflectionTemplate,
                        all_marker_names)
from .text import request_text
from .thinking import chat_template_kwargs

logger = logging.getLogger(__name__)


@dataclass
class ReflectedBatch:
    """A batch after the oracle phases, before selection: what :meth:`Recycler.reflect` hands to :meth:`finish`."""

    batch: dict[str, list]
    pairs: list[Pair | None]  # None: a bad row, skipped
    skips: list[str | None]  # why it was skipped
    outcomes: list[dict[str, Any]]  # per valid pair


def resolve_templates(config: ReflectionConfig, default_oracle: bool) -> dict[str, ReflectionTemplate]:
    chosen = config.template_set
    if chosen == "auto":
        chosen = "compact" if default_oracle else "paper"
    templates = dict(TEMPLATE_SETS[chosen])
    if config.instruction_template_path:
        templates[INSTRUCTION_REFLECTION] = ReflectionTemplate.from_file(config.instruction_template_path)
    if config.response_template_path:
        templates[RESPONSE_REFLECTION] = ReflectionTemplate.from_file(config.response_template_path)
    for phase, template in templates.items():
        if template.phase != phase:
            raise ValueError(f"template {template.id} is for {template.phase}, not {phase}")
    return templates


class Recycler:
    """Recycles instruction–response pairs through an oracle; callable as a batched ``datasets`` transform.

    Args:
        config: Reflection settings; defaults to :class:`ReflectionConfig`.
        oracle: An already-built oracle. By default it is built from ``config`` the first time a cache miss needs
            it, so a fully cached run never loads a model.
        templates: Override the templates per phase (``{"instruction_reflection": ..., ...}``).
        scorer: ``selective`` mode: what scores the versions of a pair (a
            :class:`~reflect_trainer.selection.StudentScorer` around the student). ``ReflectionSFTTrainer`` passes one.
    """

    def __init__(
        self,
        config: ReflectionConfig | None = None,
        oracle: Oracle | None = None,
        templates: dict[str, ReflectionTemplate] | None = None,
        scorer=None,
    ):
        config = config or ReflectionConfig()
        self.config, why = config.with_engine_resolved()
        if self.config is not config and oracle is None:
            logger.info("oracle engine: %s (%s)", self.config.oracle_engine, why)
        if self.config.mode == "selective" and scorer is None:
            raise ValueError(
                "mode='selective' needs the student to score the versions of each pair: use ReflectionSFTTrainer, "
                "or Recycler(config, scorer=StudentScorer(model, tokenizer))"
            )
        if self.config.oracle_engine == "self" and oracle is None:
            raise ValueError("oracle_engine='self' uses the student being trained: use ReflectionSFTTrainer")
        self.scorer = scorer
        self._oracle = oracle
        self._oracle_path = self.config.oracle_model_path
        uses_default = oracle is None and self._oracle_path is None and self.config.oracle_engine == "transformers"
        if uses_default:
            from .embedded import default_oracle_path

            self._oracle_path = str(default_oracle_path())
            if not getattr(self.config, "_embedded_oracle_by_name", False):
                # A 7B user who forgot one field must not recycle 52k pairs with a toy without being told.
                logger.warning("no oracle_model_path given: recycling with the embedded DEMO oracle, SmolLM2-135M-"
                               "Instruct (135M parameters), a toy for demos and tests. Set oracle_model_path to your "
                               "oracle (a 7B+ instruct model), or oracle_model_path='embedded:smollm2' to use the "
                               "demo oracle on purpose.")
        self.oracle_quantization, why = resolve_quantization(self.config.oracle_engine,
                                                             self.config.oracle_quantization, self.config.oracle_device)
        if self.config.oracle_quantization == "auto" and oracle is None:
            logger.info("oracle quantization: %s (%s)", self.oracle_quantization, why)
        self._oracle_identity: str | None = None  # computed on first use: an HTTP oracle's asks its server
        self.templates = templates or resolve_templates(self.config, default_oracle=uses_default)
        compact = all(t.name.startswith("compact") for t in self.templates.values())
        #: Decoding controls per phase (None in the config: auto, see oracles/decoding.py).
        self.controls = {phase: resolve_controls(self.config.oracle_repetition_penalty,
                                                 self.config.oracle_no_repeat_ngram_size, self.config.oracle_engine,
                                                 compact, phase) for phase in self.templates}
        #: Extra chat-template variables (e.g. a reasoning oracle's ``enable_thinking: false``), part of the settings.
        self.chat_template_kwargs = chat_template_kwargs(self.config.oracle_chat_template_kwargs)
        if self.config.max_thinking_tokens < 0:
            raise ValueError(f"max_thinking_tokens must be >= 0 (0: no thinking expected), got "
                             f"{self.config.max_thinking_tokens}")
        tags = self.config.oracle_thinking_tags
        if tags and (len(tags) != 2 or not all(isinstance(t, str) and t for t in tags)):
            raise ValueError(f"oracle_thinking_tags must be an opening and a closing tag such as "
                             f"['<think>', '</think>'] (or None: no stripping), got {tags!r}")
        # Every marker of the templates in use: data that looks like any of them is neutralised in prompts.
        self.marker_names = tuple(all_marker_names(list(self.templates.values())))
        self.phases = {
            "instruction": (INSTRUCTION_REFLECTION,),
            "response": (RESPONSE_REFLECTION,),
            "both": (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION),
            "selective": (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION),
        }[self.config.mode]
        self.columns = RECYCLED_COLUMNS + (SELECTION_COLUMNS if self.config.mode == "selective" else ())
        self.cache = RecycleCache(self.config.cache_dir, claim_lease_seconds=self.config.claim_lease_seconds)
        self._stats = RecycleStats()
        self._progress = None
        self.phase_runner = PhaseRunner(self.config, self.cache, self._stats, self.controls,
                                        self.chat_template_kwargs, self.marker_names, oracle=lambda: self.oracle,
                                        oracle_identity=lambda: self.oracle_identity, tick=self._tick)
        self.expected_rows: int | None = None  # for the progress bar, when known

    # ---- oracle --------------------------------------------------------------------------------------------
    @property
    def oracle(self) -> Oracle:
        if self._oracle is None:
            logger.info("loading oracle %s (%s)", self._oracle_path, self.oracle_quantization)
            self._oracle = load_oracle(self.config.oracle_engine, self._oracle_path, **self._oracle_kwargs())
        return self._oracle

    def _oracle_kwargs(self) -> dict:
        """Every engine's settings; each engine takes the ones it knows."""
        c = self.config
        kwargs = dict(quantization=self.oracle_quantization, device=c.oracle_device, batch_size=c.oracle_batch_size,
                      base_url=c.oracle_base_url, served_model=c.oracle_served_model,
                      api_key_env=c.oracle_api_key_env, concurrency=c.oracle_concurrency, timeout=c.oracle_timeout,
                      max_retries=c.oracle_max_retries,
                      structured_output_api=c.oracle_structured_output_api,
                      gpu_memory_utilization=c.oracle_gpu_memory_utilization, sleep_level=c.oracle_sleep_level,
                      context_length=c.oracle_context_length, threads=c.oracle_threads,
                      batch_tokens=c.oracle_batch_tokens, prefix_cache=c.oracle_prefix_cache,
                      revision=c.oracle_revision)
        return {k: v for k, v in kwargs.items() if v is not None}

    @property
    def oracle_identity(self) -> str:
        """The oracle's cache identity (weights, or what an HTTP server reports); computed once, without loading."""
        if self._oracle_identity is None:
            self._oracle_identity = self._oracle.identity if self._oracle is not None else oracle_identity(
                self.config.oracle_engine, self._oracle_path, **self._oracle_kwargs()
            )
        return self._oracle_identity

    @property
    def oracle_loaded(self) -> bool:
        return self._oracle is not None

    def release_oracle(self) -> None:
        """Free the oracle's memory (it is reloaded if a later miss needs it)."""
        if self._oracle is not None:
            self._oracle.close()
            self._oracle = None

    def expect_rows(self, n: int) -> None:
        """``n`` rows are coming (the progress bar's total, with an ETA); the first figure known stands."""
        if self.expected_rows is None and n:
            self.expected_rows = n

    def join_collective_scoring(self) -> None:
        """A rank with no row to recycle in a buffer still joins a lockstep scorer's call: under ZeRO-3 the
        student's forward passes are collective, and its peers wait for this rank."""
        if self.scorer is not None and self.scorer.lockstep:
            self.scorer.score([])

    def stats(self) -> dict[str, float]:
        out = self._stats.as_dict()
        # The cache's health, next to the takeovers: both should stay 0.
        out["cache_duplicates_seen"] = self.cache.duplicates_seen  # keys with two different stored records
        out["cache_leases_lost"] = self.cache.leases_lost  # claims of this process that another one took over
        return out

    def _record_passed_through(self, fmt: str) -> None:
        if not self._stats.rows_passed_through:  # logged once: a whole data set may be like this
            logger.info("%s rows without a final user→assistant exchange (pre-tokenized, or a conversation ending with "
                        "a user turn, a tool turn or non-text content) cannot be recycled: they are passed through "
                        "untouched and counted (rows_passed_through)", fmt)
        self._stats.rows_passed_through += 1

    def record_skipped(self, errors) -> None:
        """Count rows dropped as bad input (by validation done elsewhere)."""
        for err in errors:
            self._stats.rows_skipped += 1
            self._stats.skip_reasons[err.reason] += 1

    # ---- the transform -------------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        """Batched transform: returns the batch with :attr:`columns` added."""
        return self.finish(self.reflect(batch, indices))

    def reflect(self, batch: dict[str, list], indices: list[int] | None = None) -> "ReflectedBatch":
        """First half of the transform: check the rows and run the oracle phases (no student involved).

        Safe in a background thread while the student trains; :meth:`finish` then runs in the training thread.
        """
        n = len(next(iter(batch.values()))) if batch else 0
        fmt = row_format(batch.keys())
        if indices is None and "row_index" in batch:
            indices = batch["row_index"]
        pairs: list[Pair | None] = []
        skips: list[str | None] = []
        for i in range(n):
            label = indices[i] if indices is not None else f"at batch position {i}"
            pair = read_row({k: batch[k][i] for k in batch}, fmt, label, self.config.max_field_chars,
                            self.config.on_bad_row)
            if isinstance(pair, BadRowError):
                self.record_skipped([pair])
                pairs.append(None)
                skips.append(str(pair))
            elif pair is None:
                self._record_passed_through(fmt)
                pairs.append(None)
                skips.append(PASSED_THROUGH)
            else:
                pairs.append(pair)
                skips.append(None)
        outcomes = self._run_phases([p for p in pairs if p is not None])
        return ReflectedBatch(batch, pairs, skips, outcomes)

    def finish(self, reflected: "ReflectedBatch") -> dict[str, list]:
        """Second half of the transform: in selective mode the student scores and picks; then the columns."""
        self._complete([p for p in reflected.pairs if p is not None], reflected.outcomes)
        it = iter(reflected.outcomes)
        columns: dict[str, list] = {name: [] for name in self.columns}
        for pair, skip in zip(reflected.pairs, reflected.skips):
            row = (
                _row_columns(pair, next(it)) if pair is not None
                else {**dict.fromkeys(self.columns), "skip_reason": skip}
            )
            for name in self.columns:
                columns[name].append(row[name])
        return {**reflected.batch, **columns}

    def recycle_pairs(self, pairs: list[Pair]) -> list[dict[str, Any]]:
        """Run the configured phases over ``pairs``; returns, per pair, each phase's outcome (and, in selective
        mode, the ``a`` outcome under :data:`RESPONSE_REFLECTION_OF_ORIGINAL` and the ``selection``)."""
        outcomes = self._run_phases(pairs)
        self._complete(pairs, outcomes)
        return outcomes

    def _complete(self, pairs: list[Pair], outcomes: list[dict[str, Any]]) -> None:
        """Selective mode: the student scores and picks (``outcome["selection"]``). Then count the rows done."""
        if self.config.mode == "selective":
            for outcome, selection in zip(outcomes, self._select(pairs, outcomes)):
                outcome["selection"] = selection
        self._stats.rows_recycled += len(pairs)

    def _run_phases(self, pairs: list[Pair]) -> list[dict[str, Any]]:
        self._stats.rows_seen += len(pairs)
        self._stats.marker_like_rows += sum(
            has_marker_like_text(p.instruction + p.input + p.output, self.marker_names) for p in pairs
        )
        self._open_progress()
        outcomes: list[dict[str, Any]] = [{} for _ in pairs]
        if self.config.mode == "selective":
            # Response reflection of the original (a) and of the reflected pair (qa) go to the oracle in one call;
            # where instruction reflection fell back the two are the same prompt, generated once (same cache key).
            reflected = self._run_phase(self.templates[INSTRUCTION_REFLECTION], pairs)
            answers = self._run_phase(
                self.templates[RESPONSE_REFLECTION], [*pairs, *(o.pair for o in reflected)],
                [RESPONSE_REFLECTION_OF_ORIGINAL] * len(pairs) + [RESPONSE_REFLECTION] * len(pairs),
            )
            for i in range(len(pairs)):
                outcomes[i] = {INSTRUCTION_REFLECTION: reflected[i], RESPONSE_REFLECTION_OF_ORIGINAL: answers[i],
                               RESPONSE_REFLECTION: answers[len(pairs) + i]}
        else:
            current = list(pairs)
            for phase in self.phases:
                results = self._run_phase(self.templates[phase], current)
                for i, outcome in enumerate(results):
                    outcomes[i][phase] = outcome
                    current[i] = outcome.pair
        return outcomes

    # ---- selective reflection ------------------------------------------------------------------------------------
    def _select(self, pairs: list[Pair], outcomes: list[dict]) -> list[dict]:
        """Score every version of every pair with the student (cached) and apply the paper's rule."""
        texts = []
        for pair, outcome in zip(pairs, outcomes):
            versions = _versions(pair, outcome)
            texts += [(_request(versions[v]), versions[v].output) for v in VERSIONS]
        scores = self._cached_scores(texts)
        selections = []
        for i, pair in enumerate(pairs):
            by_version = dict(zip(VERSIONS, scores[4 * i : 4 * i + 4]))
            chosen = select_version(by_version, self.config.selection_threshold, self.config.selection_drop)
            self._stats.selected[chosen or "dropped"] += 1
            selections.append({"scores": by_version, "version": chosen})
        return selections

    def _cached_scores(self, texts: list[tuple[str, str]]) -> list[PairScores]:
        """Scores by content address. Computed scores are stored durably, like oracle texts; the choice is made
        on read, so changing the threshold needs no rescoring."""
        keys = [cache_key({"kind": "scores", "scoring": SCORING_VERSION, "scorer": self.scorer.identity,
                           "instruction": q, "answer": a}) for q, a in texts]
        self.cache.refresh()
        order, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self.cache and k not in seen:
                order.append(i)
                seen.add(k)
        computed: dict[str, PairScores] = {}
        if order or self.scorer.lockstep:  # a lockstep scorer is called even with nothing to do: its peers wait
            for i, scores in zip(order, self.scorer.score([texts[i] for i in order])):
                computed.setdefault(keys[i], scores)
            self.cache.put_many([{"key": k, "kind": "scores", "ifd": v.ifd, "reverse_ifd": v.reverse_ifd,
                                  "t": time.time()} for k, v in computed.items() if k not in self.cache])
        self._stats.scores_computed += len(order)
        self._stats.scores_cached += len(keys) - len(order)
        records = {k: self.cache.get(k) for k in keys if k not in computed}
        return [computed.get(k) or PairScores(records[k]["ifd"], records[k]["reverse_ifd"]) for k in keys]

    def _steps_per_pair(self) -> int:
        """Oracle steps one pair goes through (selective mode reflects two answers per pair)."""
        instruction = len(self.templates[INSTRUCTION_REFLECTION].steps) if INSTRUCTION_REFLECTION in self.phases else 0
        response = len(self.templates[RESPONSE_REFLECTION].steps) if RESPONSE_REFLECTION in self.phases else 0
        return instruction + response * (2 if self.config.mode == "selective" else 1)

    def _open_progress(self) -> None:
        if self.config.progress_bar and self._progress is None:
            total = self.expected_rows * self._steps_per_pair() if self.expected_rows is not None else None
            self._progress = RecycleProgress(total, self._stats)

    def _tick(self, pair_steps: int) -> None:
        if self._progress is not None:
            self._progress.tick(pair_steps)

    def _run_phase(self, template: ReflectionTemplate, inputs: list[Pair],
                   stat_labels: list[str] | None = None) -> list[PhaseOutcome]:
        return self.phase_runner.run(template, inputs, stat_labels)

    # ---- whole data sets ----------------------------------------------------------------------------------------
    def recycle_dataset(self, dataset, batch_size: int = 16):
        """Validate, then recycle every row of a map-style data set; returns a new ``datasets.Dataset``.

        Bad rows raise (``on_bad_row="error"``) before any oracle work, or are dropped, counted and logged.
        """
        from datasets import Dataset

        report = validate_rows(dataset, self.config.on_bad_row, self.config.max_field_chars)
        self.record_skipped(report.skipped.values())
        if report.skipped:
            dataset = dataset.select(report.valid_indices)
        self.expected_rows = len(dataset)
        started = time.perf_counter()
        columns: dict[str, list] = {}
        for start in range(0, len(dataset), batch_size):
            indices = report.valid_indices[start : start + batch_size]
            out = self(dataset[start : start + batch_size], indices=indices)
            for k, v in out.items():
                columns.setdefault(k, []).extend(v)
        self.close_progress()
        self.log_summary(time.perf_counter() - started)
        if not columns:  # no usable row: an empty data set with the columns it would have had
            columns = {name: [] for name in dict.fromkeys([*dataset.column_names, *self.columns])}
        return Dataset.from_dict(columns)

    def close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def log_summary(self, seconds: float | None = None) -> None:
        """Log accept rates per phase, fallback reasons, oracle throughput (and pairs/s over ``seconds``)."""
        log_summary(self.stats(), self.phases, seconds, logger)


def _request(pair: Pair) -> str:
    return request_text(pair.instruction, pair.input)


def _versions(pair: Pair, outcome: dict) -> dict[str, Pair]:
    """The paper's four versions of a row: original, q, a (response-reflected original), qa."""
    q = outcome[INSTRUCTION_REFLECTION].pair
    return {"original": pair, "q": q, "a": outcome[RESPONSE_REFLECTION_OF_ORIGINAL].pair,
            "qa": outcome[RESPONSE_REFLECTION].pair}


def _row_columns(pair: Pair, outcome: dict[str, Any]) -> dict[str, Any]:
    ir, rr = outcome.get(INSTRUCTION_REFLECTION), outcome.get(RESPONSE_REFLECTION)
    final = (rr or ir).pair
    selection = outcome.get("selection")
    if selection is not None:
        final = _versions(pair, outcome)[selection["version"] or "original"]
    row = {
        "recycled_instruction": final.instruction,
        "recycled_input": final.input,
        "recycled_output": final.output,
        "reflected_instruction": ir.pair.instruction if ir else None,
        "reflected_output": ir.pair.output if ir else None,
        raw_column(INSTRUCTION_REFLECTION): ir.raw if ir else None,
        raw_column(RESPONSE_REFLECTION): rr.raw if rr else None,
        fallback_column(INSTRUCTION_REFLECTION): ir.reason if ir else None,
        fallback_column(RESPONSE_REFLECTION): rr.reason if rr else None,
        finish_column(INSTRUCTION_REFLECTION): ir.finish if ir else None,
        finish_column(RESPONSE_REFLECTION): rr.finish if rr else None,
        "skip_reason": None,
    }
    if selection is not None:
        a = outcome[RESPONSE_REFLECTION_OF_ORIGINAL]
        row.update(a_output=a.pair.output, a_raw=a.raw, a_fallback=a.reason, a_finish=a.finish,
                   qa_output=rr.pair.output, selected_version=selection["version"])
        for version, scores in selection["scores"].items():
            row[f"ifd_{version}"], row[f"rifd_{version}"] = scores.ifd, scores.reverse_ifd
        if selection["version"] is None:
            row["skip_reason"] = DROPPED_BY_SELECTION
    return row
