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
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .cache import RecycleCache, cache_key
from .config import ReflectionConfig
from .formats import BadRowError, Pair, read_row, row_format, validate_rows
from .text import ends_mid_sentence, request_text
from .oracles.decoding import resolve_controls
from .oracles import (
    FINISH_ERROR,
    FINISH_UNKNOWN,
    Generation,
    GenerationSettings,
    Oracle,
    as_generation,
    load_oracle,
    oracle_identity,
    resolve_quantization,
)
from .parsing import (
    PARSED_BUT_REJECTED,
    has_marker_like_text,
    marker_regex,
    neutralize_markers,
    parse_step_output,
)
from .templates import (
    END_MARKER,
    INSTRUCTION_REFLECTION,
    RESPONSE_REFLECTION,
    TEMPLATE_SETS,
    ReflectionStep,
    all_marker_names,
    ReflectionTemplate,
    render,
    render_fields,
)
from .schema import (DROPPED_BY_SELECTION, PASSED_THROUGH, RECYCLED_COLUMNS,  # noqa: F401 (public names)
                     RESPONSE_REFLECTION_OF_ORIGINAL, SELECTION_COLUMNS, VERSIONS, fallback_column, finish_column,
                     oracle_tokens_per_s, raw_column)
from .selection import SCORING_VERSION, PairScores, select_version
from .structured import section_format_for
from .thinking import chat_template_kwargs

logger = logging.getLogger(__name__)


@dataclass
class PhaseOutcome:
    pair: Pair  # the phase's result: the new pair, or the input pair when it fell back
    raw: str  # the oracle's texts for this phase, pre-fills included, steps separated by blank lines
    reason: str | None  # fallback reason, None when accepted
    finish: str = ""  # why the oracle stopped, per step ("stop", "length", ...), comma-separated


@dataclass
class ReflectedBatch:
    """A batch after the oracle phases, before selection: what :meth:`Recycler.reflect` hands to :meth:`finish`."""

    batch: dict[str, list]
    pairs: list[Pair | None]  # None: a bad row, skipped
    skips: list[str | None]  # why it was skipped
    outcomes: list[dict[str, Any]]  # per valid pair


@dataclass
class RecycleStats:
    """Counters, exposed by :meth:`Recycler.stats` as a flat dict (ready for the Trainer's log)."""

    rows_seen: int = 0
    rows_recycled: int = 0
    rows_skipped: int = 0
    rows_passed_through: int = 0  # rows with no exchange to recycle (pre-tokenized, a conversation ending elsewhere)
    skip_reasons: Counter = field(default_factory=Counter)
    marker_like_rows: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    waited_for_other_writer: int = 0
    claims_taken_over: int = 0  # keys whose owner died or went silent, generated here instead
    oracle_calls: int = 0
    oracle_prompts: int = 0
    oracle_tokens: int = 0
    oracle_seconds: float = 0.0
    phase_counts: Counter = field(default_factory=Counter)  # (phase, "parsed"|"accepted"|"total"|reason)
    scores_computed: int = 0
    scores_cached: int = 0
    selected: Counter = field(default_factory=Counter)  # version -> rows ("dropped" for None)

    def as_dict(self) -> dict[str, float]:
        # list(...) snapshots: the Trainer's log reads these while a background prefetch may add keys.
        out: dict[str, float] = {
            k: v for k, v in list(self.__dict__.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        out["oracle_tokens_per_s"] = oracle_tokens_per_s(out)
        for reason, n in list(self.skip_reasons.items()):
            out[f"skipped/{reason}"] = n
        for (phase, what), n in list(self.phase_counts.items()):
            out[f"{phase}/{what}"] = n
        for version, n in list(self.selected.items()):
            out[f"selected/{version}"] = n
        for phase in (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION, RESPONSE_REFLECTION_OF_ORIGINAL):
            total = self.phase_counts.get((phase, "total"), 0)
            if total:
                out[f"{phase}/parse_rate"] = self.phase_counts[(phase, "parsed")] / total
                out[f"{phase}/accept_rate"] = self.phase_counts[(phase, "accepted")] / total
        return out


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
        # The bar counts pair-steps (one pair through one template step), so it moves after every oracle call of a
        # buffer, not once per buffer (minutes apart on a CPU), and tqdm's ETA is there from the first call.
        if self.config.progress_bar and self._progress is None:
            from tqdm.auto import tqdm

            total = self.expected_rows * self._steps_per_pair() if self.expected_rows is not None else None
            self._progress = tqdm(total=total, desc="recycling", unit="step", dynamic_ncols=True)

    def _tick(self, pair_steps: int) -> None:
        if self._progress is None or not pair_steps:
            return
        self._progress.update(pair_steps)
        s = self._stats
        self._progress.set_postfix(pairs=s.rows_recycled, hits=s.cache_hits, oracle_tok=s.oracle_tokens,
                                   refresh=False)

    # ---- one phase -------------------------------------------------------------------------------------------
    def _run_phase(self, template: ReflectionTemplate, inputs: list[Pair],
                   stat_labels: list[str] | None = None) -> list[PhaseOutcome]:
        labels = stat_labels or [template.phase] * len(inputs)
        fields = [{"instruction": p.instruction, "input": p.input, "output": p.output} for p in inputs]
        raws: list[list[str]] = [[] for _ in inputs]
        finishes: list[list[str]] = [[] for _ in inputs]
        reasons: list[str | None] = [None] * len(inputs)
        for step in template.steps:
            alive = [i for i in range(len(inputs)) if reasons[i] is None]
            if not alive:
                break
            prompts = {i: self._step_prompt(template, step, fields[i]) for i in alive}
            records = self._generate_by_budget(template, step, {i: prompts[i][0] for i in alive},
                                               {i: self._budget(step, fields[i]) for i in alive})
            self._tick(len(alive))
            for i in alive:
                conversation, prefill_section, prefill_body = prompts[i]
                record = records[i]
                prefill = conversation[-1]["content"] if conversation[-1]["role"] == "assistant" else ""
                raws[i].append(prefill + record["raw"])
                finish = record.get("finish", FINISH_UNKNOWN)  # records cached before finish reasons: unknown
                finishes[i].append(finish)
                if finish == FINISH_ERROR:
                    reasons[i] = record.get("error") or "oracle_error"
                    continue
                originals = {
                    "instruction": request_text(inputs[i].instruction, inputs[i].input),
                    "output": inputs[i].output,
                }
                parsed = parse_step_output(
                    record["raw"],
                    step.sections,
                    prefill_section,
                    prefill_body,
                    originals,
                    boilerplate=_boilerplate(step),
                    placeholders=step.placeholders,
                    prompt="\n".join(m["content"] for m in conversation if m["role"] != "assistant"),
                    finish_reason=finish,
                    gates=self.config.gates,
                    rewrites_answer=template.phase == RESPONSE_REFLECTION,
                    thinking_tags=self.config.oracle_thinking_tags,
                )
                if parsed.ok:
                    fields[i].update(parsed.fields)
                    if "instruction" in parsed.fields:
                        fields[i]["input"] = ""  # the new instruction is self-contained (input merged in)
                else:
                    reasons[i] = parsed.reason
        self._tick(sum(len(template.steps) - len(raws[i]) for i in range(len(inputs))))  # steps a fallback skipped
        outcomes = []
        for i, pair in enumerate(inputs):
            reason, phase = reasons[i], labels[i]
            self._stats.phase_counts[(phase, "total")] += 1
            if reason is None or reason in PARSED_BUT_REJECTED:
                self._stats.phase_counts[(phase, "parsed")] += 1
            if reason is None:
                self._stats.phase_counts[(phase, "accepted")] += 1
                new = Pair(fields[i]["instruction"], fields[i]["input"], fields[i]["output"], pair.history)
                if ends_mid_sentence(new.output):  # should stay 0: the truncation gate's own check
                    self._stats.phase_counts[(phase, "accepted_ending_mid_sentence")] += 1
            else:
                self._stats.phase_counts[(phase, f"fallback/{reason}")] += 1
                new = pair
            outcomes.append(PhaseOutcome(pair=new, raw="\n\n".join(raws[i]), reason=reason,
                                         finish=",".join(finishes[i])))
        return outcomes

    def _budget(self, step: ReflectionStep, pair_fields: dict[str, str]) -> int:
        """Tokens the oracle may write for this step and pair: a step's own fixed budget, or, for a step that writes
        an answer, enough to rewrite the answer at hand (its length x ``length_budget_ratio``), within the cap.
        Rounded up to a multiple of 64 so a buffer needs only a few ``generate`` calls (one per budget). A reasoning
        oracle's ``max_thinking_tokens`` come on top, so its thinking does not eat the answer's budget."""
        c = self.config
        if step.max_new_tokens is not None or "output" not in step.sections or not c.length_budget_ratio:
            return min(step.max_new_tokens or c.max_new_tokens, c.max_new_tokens) + c.max_thinking_tokens
        estimated_tokens = len(pair_fields["output"]) / 4  # no tokenizer needed: the budget is part of the key
        wanted = step.budget_base + c.length_budget_ratio * estimated_tokens
        return min(c.max_new_tokens, -(-int(wanted) // 64) * 64) + c.max_thinking_tokens

    def _generate_by_budget(self, template: ReflectionTemplate, step: ReflectionStep,
                            conversations: dict[int, list], budgets: dict[int, int]) -> dict[int, dict]:
        """One oracle call (per cache miss set) for each distinct budget of the step; records by row."""
        records: dict[int, dict] = {}
        for budget in sorted(set(budgets.values())):
            rows = [i for i in conversations if budgets[i] == budget]
            generated = self._generate_cached(template, step, [conversations[i] for i in rows], budget)
            records.update(zip(rows, generated))
        return records

    def _step_prompt(self, template: ReflectionTemplate, step: ReflectionStep, pair_fields: dict[str, str]):
        safe = render_fields(
            *(neutralize_markers(pair_fields[k], self.marker_names) for k in ("instruction", "input", "output"))
        )
        conversation = []
        if step.system:
            conversation.append({"role": "system", "content": render(step.system, safe)})
        conversation.append({"role": "user", "content": render(step.user, safe)})
        prefill_section, prefill_body = None, ""
        if step.prefill:
            prefill = render(step.prefill, safe)
            conversation.append({"role": "assistant", "content": prefill})
            opener = _prefill_opener(step, prefill)
            if opener:
                prefill_section, prefill_body = opener[0], prefill[opener[1]:]
        return conversation, prefill_section, prefill_body

    def _settings(self, phase: str, step: ReflectionStep, max_new_tokens: int) -> GenerationSettings:
        c = self.config
        section_format, stop = None, step.stop
        if c.structured_output:
            opener = _prefill_opener(step, step.prefill)
            section_format = section_format_for(step.sections, opener[0] if opener else None)
            # The format ends the output itself after the last [End]; an [End] stop would cut it after the first.
            stop = tuple(s for s in step.stop if END_MARKER.lower() not in s.lower())
        return GenerationSettings(
            max_new_tokens=max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=c.oracle_seed,
            stop=stop,
            section_format=section_format,
            repetition_penalty=self.controls[phase][0],
            no_repeat_ngram_size=self.controls[phase][1],
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def _generate_cached(self, template: ReflectionTemplate, step: ReflectionStep, conversations: list,
                         max_new_tokens: int) -> list[dict]:
        """Serve cached records; send all misses of this batch to the oracle in one call; store them durably."""
        settings = self._settings(template.phase, step, max_new_tokens)
        keys = [
            cache_key(
                {
                    "phase": template.phase,
                    "template": template.id,
                    "step": template.step_fingerprint(step),
                    "oracle": self.oracle_identity,
                    "generation": settings.to_dict(),
                    "messages": conversation,
                }
            )
            for conversation in conversations
        ]
        by_key = dict(zip(keys, conversations))
        fetched = self.cache.get_or_generate(
            keys, lambda mine: self._call_oracle(mine, [by_key[k] for k in mine], settings, template, step)
        )
        self._stats.cache_hits += fetched.hits
        self._stats.cache_misses += fetched.misses
        self._stats.waited_for_other_writer += fetched.waited
        self._stats.claims_taken_over += fetched.taken_over
        return [fetched.records[k] for k in keys]

    def _call_oracle(self, keys, conversations, settings, template, step) -> tuple[list[dict], dict[str, dict]]:
        """Generate ``keys``: returns the records to store (with their finish reasons) and the records of rows the
        oracle could not answer (``finish="error"``), which are not cached, so a later run asks again."""
        oracle = self.oracle
        tokens_before = oracle.tokens_generated

        def record(k: str, g: Generation) -> dict:
            return {"key": k, "raw": g.text, "finish": g.finish_reason, "phase": template.phase,
                    "template": template.id, "step": step.name, "t": time.time()}

        stream = {}
        if getattr(oracle, "streams_results", False):  # store each answer as it arrives (see RecycleCache)
            def stored_at_once(i: int, g: Generation) -> None:
                g = as_generation(g)
                if g.finish_reason != FINISH_ERROR:
                    self.cache.store_early([record(keys[i], g)])

            stream = {"on_result": stored_at_once}
        start = time.perf_counter()
        outputs = [as_generation(g) for g in oracle.generate(conversations, settings, **stream)]
        elapsed = time.perf_counter() - start
        if len(outputs) != len(conversations):
            raise RuntimeError(f"oracle returned {len(outputs)} texts for {len(conversations)} prompts")
        self._stats.oracle_calls += 1
        self._stats.oracle_prompts += len(conversations)
        self._stats.oracle_tokens += oracle.tokens_generated - tokens_before
        self._stats.oracle_seconds += elapsed
        records = {k: record(k, g) for k, g in zip(keys, outputs)}
        failed = {}
        for k, g in zip(keys, outputs):
            if g.finish_reason == FINISH_ERROR:
                failed[k] = {**records.pop(k), "error": g.error or "oracle_error"}
        return list(records.values()), failed

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
        s = self.stats()
        if seconds:
            logger.info("recycled %d pairs in %.0f s: %.3f pairs/s", s["rows_recycled"], seconds,
                        s["rows_recycled"] / seconds)
        for phase in self.phases:
            if f"{phase}/parse_rate" in s:
                logger.info(
                    "%s: parsed %.0f%%, accepted %.0f%% of %d; fallbacks: %s",
                    phase,
                    100 * s[f"{phase}/parse_rate"],
                    100 * s[f"{phase}/accept_rate"],
                    s[f"{phase}/total"],
                    {k.split("/", 2)[2]: v for k, v in s.items() if k.startswith(f"{phase}/fallback/")},
                )
        logger.info(
            "oracle: %d calls, %d prompts, %d tokens, %.1f tok/s; cache hits %d",
            s["oracle_calls"], s["oracle_prompts"], s["oracle_tokens"], s["oracle_tokens_per_s"], s["cache_hits"],
        )


def _prefill_opener(step: ReflectionStep, prefill: str) -> tuple[str, int] | None:
    """``(section name, end offset)`` of the section marker a pre-fill starts with, if any."""
    opener = marker_regex(list(step.sections.values())).match(prefill)
    if not opener:
        return None
    name = next(n for n in step.sections.values() if re.fullmatch(
        r"\[\s*" + r"\s+".join(map(re.escape, n.split())) + r"\s*\]\s*:?\s*", opener.group(0), re.I))
    return name, opener.end()


def _request(pair: Pair) -> str:
    return request_text(pair.instruction, pair.input)


def _versions(pair: Pair, outcome: dict) -> dict[str, Pair]:
    """The paper's four versions of a row: original, q, a (response-reflected original), qa."""
    q = outcome[INSTRUCTION_REFLECTION].pair
    return {"original": pair, "q": q, "a": outcome[RESPONSE_REFLECTION_OF_ORIGINAL].pair,
            "qa": outcome[RESPONSE_REFLECTION].pair}


def _boilerplate(step: ReflectionStep) -> str:
    """The template's own words around the data: an output that repeats them is an echo of the prompt."""
    return re.sub(r"\{\w+\}", " ", f"{step.system or ''}\n{step.user}")


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
