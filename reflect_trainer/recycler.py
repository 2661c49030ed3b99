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
from .formats import BadRowError, Pair, detect_format, row_to_pair, validate_rows
from .oracles import GenerationSettings, Oracle, load_oracle, oracle_identity
from .parsing import (
    UNPARSED_REASONS,
    has_marker_like_text,
    marker_regex,
    neutralize_markers,
    parse_step_output,
)
from .templates import (
    INSTRUCTION_REFLECTION,
    RESPONSE_REFLECTION,
    TEMPLATE_SETS,
    ReflectionStep,
    ReflectionTemplate,
    render,
    render_fields,
)

logger = logging.getLogger(__name__)

#: Columns the transform adds to each row.
RECYCLED_COLUMNS = (
    "recycled_instruction",
    "recycled_input",
    "recycled_output",
    "reflected_instruction",
    "reflected_output",
    "instruction_reflection_raw",
    "response_reflection_raw",
    "instruction_reflection_fallback",
    "response_reflection_fallback",
    "skip_reason",
)


@dataclass
class PhaseOutcome:
    pair: Pair  # the phase's result: the new pair, or the input pair when it fell back
    raw: str  # the oracle's texts for this phase, pre-fills included, steps separated by blank lines
    reason: str | None  # fallback reason, None when accepted


@dataclass
class RecycleStats:
    """Counters, exposed by :meth:`Recycler.stats` as a flat dict (ready for the Trainer's log)."""

    rows_seen: int = 0
    rows_recycled: int = 0
    rows_skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    marker_like_rows: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    waited_for_other_writer: int = 0
    oracle_calls: int = 0
    oracle_prompts: int = 0
    oracle_tokens: int = 0
    oracle_seconds: float = 0.0
    phase_counts: Counter = field(default_factory=Counter)  # (phase, "parsed"|"accepted"|"total"|reason)

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {
            k: v for k, v in self.__dict__.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        out["oracle_tokens_per_s"] = self.oracle_tokens / self.oracle_seconds if self.oracle_seconds else 0.0
        for reason, n in self.skip_reasons.items():
            out[f"skipped/{reason}"] = n
        for (phase, what), n in self.phase_counts.items():
            out[f"{phase}/{what}"] = n
        for phase in (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION):
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
    """

    def __init__(
        self,
        config: ReflectionConfig | None = None,
        oracle: Oracle | None = None,
        templates: dict[str, ReflectionTemplate] | None = None,
    ):
        self.config = config or ReflectionConfig()
        self._oracle = oracle
        self._oracle_path = self.config.oracle_model_path
        uses_default = oracle is None and self._oracle_path is None and self.config.oracle_engine == "transformers"
        if uses_default:
            from .embedded import default_oracle_path

            self._oracle_path = str(default_oracle_path())
        if oracle is not None:
            self.oracle_identity = oracle.identity
        else:
            self.oracle_identity = oracle_identity(self.config.oracle_engine, self._oracle_path, **self._oracle_kwargs())
        self.templates = templates or resolve_templates(self.config, default_oracle=uses_default)
        self.phases = {
            "instruction": (INSTRUCTION_REFLECTION,),
            "response": (RESPONSE_REFLECTION,),
            "both": (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION),
        }[self.config.mode]
        self.cache = RecycleCache(self.config.cache_dir)
        self._stats = RecycleStats()
        self._progress = None
        self.expected_rows: int | None = None  # for the progress bar, when known

    # ---- oracle --------------------------------------------------------------------------------------------
    @property
    def oracle(self) -> Oracle:
        if self._oracle is None:
            logger.info("loading oracle %s (%s)", self._oracle_path, self.config.oracle_quantization)
            self._oracle = load_oracle(self.config.oracle_engine, self._oracle_path, **self._oracle_kwargs())
        return self._oracle

    def _oracle_kwargs(self) -> dict:
        """Every engine's settings; each engine takes the ones it knows."""
        c = self.config
        kwargs = dict(quantization=c.oracle_quantization, device=c.oracle_device, batch_size=c.oracle_batch_size,
                      base_url=c.oracle_base_url, served_model=c.oracle_served_model,
                      api_key_env=c.oracle_api_key_env, concurrency=c.oracle_concurrency, timeout=c.oracle_timeout,
                      gpu_memory_utilization=c.oracle_gpu_memory_utilization, sleep_level=c.oracle_sleep_level,
                      context_length=c.oracle_context_length, threads=c.oracle_threads)
        return {k: v for k, v in kwargs.items() if v is not None}

    @property
    def oracle_loaded(self) -> bool:
        return self._oracle is not None

    def release_oracle(self) -> None:
        """Free the oracle's memory (it is reloaded if a later miss needs it)."""
        if self._oracle is not None:
            self._oracle.close()
            self._oracle = None

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()

    def record_skipped(self, errors) -> None:
        """Count rows dropped as bad input (by validation done elsewhere)."""
        for err in errors:
            self._stats.rows_skipped += 1
            self._stats.skip_reasons[err.reason] += 1

    # ---- the transform -------------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        """Batched transform: returns the batch with :data:`RECYCLED_COLUMNS` added."""
        n = len(next(iter(batch.values()))) if batch else 0
        fmt = detect_format(batch.keys())
        if indices is None and "row_index" in batch:
            indices = batch["row_index"]
        pairs: list[Pair | None] = []
        skips: list[str | None] = []
        for i in range(n):
            label = indices[i] if indices is not None else f"at batch position {i}"
            try:
                pair = row_to_pair({k: batch[k][i] for k in batch}, fmt, label, self.config.max_field_chars)
                pairs.append(pair)
                skips.append(None)
            except BadRowError as err:
                if self.config.on_bad_row == "error":
                    raise
                logger.warning("skipping bad row: %s", err)
                self.record_skipped([err])
                pairs.append(None)
                skips.append(str(err))
        results = self.recycle_pairs([p for p in pairs if p is not None])
        it = iter(results)
        columns: dict[str, list] = {name: [] for name in RECYCLED_COLUMNS}
        for pair, skip in zip(pairs, skips):
            row = _row_columns(pair, next(it)) if pair is not None else {**dict.fromkeys(RECYCLED_COLUMNS), "skip_reason": skip}
            for name in RECYCLED_COLUMNS:
                columns[name].append(row[name])
        return {**batch, **columns}

    def recycle_pairs(self, pairs: list[Pair]) -> list[dict[str, PhaseOutcome]]:
        """Run the configured phases over ``pairs``; returns, per pair, each phase's outcome."""
        self._stats.rows_seen += len(pairs)
        self._stats.marker_like_rows += sum(
            has_marker_like_text(p.instruction + p.input + p.output) for p in pairs
        )
        self._open_progress()
        outcomes: list[dict[str, PhaseOutcome]] = [{} for _ in pairs]
        current = list(pairs)
        for phase in self.phases:
            results = self._run_phase(self.templates[phase], current)
            for i, outcome in enumerate(results):
                outcomes[i][phase] = outcome
                current[i] = outcome.pair
        self._stats.rows_recycled += len(pairs)
        self._tick(len(pairs))
        return outcomes

    def _open_progress(self) -> None:
        if self.config.progress_bar and self._progress is None:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=self.expected_rows, desc="recycling", unit="pair", dynamic_ncols=True)

    def _tick(self, n: int) -> None:
        if self._progress is None:
            return
        self._progress.update(n)
        s = self._stats
        self._progress.set_postfix(hits=s.cache_hits, oracle_tok=s.oracle_tokens, refresh=False)

    # ---- one phase -------------------------------------------------------------------------------------------
    def _run_phase(self, template: ReflectionTemplate, inputs: list[Pair]) -> list[PhaseOutcome]:
        phase = template.phase
        fields = [{"instruction": p.instruction, "input": p.input, "output": p.output} for p in inputs]
        raws: list[list[str]] = [[] for _ in inputs]
        reasons: list[str | None] = [None] * len(inputs)
        for step in template.steps:
            alive = [i for i in range(len(inputs)) if reasons[i] is None]
            if not alive:
                break
            prompts = [self._step_prompt(template, step, fields[i]) for i in alive]
            records = self._generate_cached(template, step, [p[0] for p in prompts])
            for i, (conversation, prefill_section, prefill_body), record in zip(alive, prompts, records):
                prefill = conversation[-1]["content"] if conversation[-1]["role"] == "assistant" else ""
                raws[i].append(prefill + record["raw"])
                originals = {"instruction": inputs[i].instruction + (f"\n\n{inputs[i].input}" if inputs[i].input else ""),
                             "output": inputs[i].output}
                parsed = parse_step_output(
                    record["raw"],
                    step.sections,
                    prefill_section,
                    prefill_body,
                    originals,
                    boilerplate=_boilerplate(step),
                    placeholders=step.placeholders,
                    prompt="\n".join(m["content"] for m in conversation if m["role"] != "assistant"),
                )
                if parsed.ok:
                    fields[i].update(parsed.fields)
                    if "instruction" in parsed.fields:
                        fields[i]["input"] = ""  # the new instruction is self-contained (input merged in)
                else:
                    reasons[i] = parsed.reason
        outcomes = []
        for i, pair in enumerate(inputs):
            reason = reasons[i]
            self._stats.phase_counts[(phase, "total")] += 1
            if reason not in UNPARSED_REASONS:
                self._stats.phase_counts[(phase, "parsed")] += 1
            if reason is None:
                self._stats.phase_counts[(phase, "accepted")] += 1
                new = Pair(fields[i]["instruction"], fields[i]["input"], fields[i]["output"], pair.history)
            else:
                self._stats.phase_counts[(phase, f"fallback/{reason}")] += 1
                new = pair
            outcomes.append(PhaseOutcome(pair=new, raw="\n\n".join(raws[i]), reason=reason))
        return outcomes

    def _step_prompt(self, template: ReflectionTemplate, step: ReflectionStep, pair_fields: dict[str, str]):
        safe = render_fields(*(neutralize_markers(pair_fields[k]) for k in ("instruction", "input", "output")))
        conversation = []
        if step.system:
            conversation.append({"role": "system", "content": render(step.system, safe)})
        conversation.append({"role": "user", "content": render(step.user, safe)})
        prefill_section, prefill_body = None, ""
        if step.prefill:
            prefill = render(step.prefill, safe)
            conversation.append({"role": "assistant", "content": prefill})
            opener = marker_regex(list(step.sections.values())).match(prefill)
            if opener:
                prefill_section = next(n for n in step.sections.values() if re.fullmatch(
                    r"\[\s*" + r"\s+".join(map(re.escape, n.split())) + r"\s*\]\s*:?\s*", opener.group(0), re.I))
                prefill_body = prefill[opener.end():]
        return conversation, prefill_section, prefill_body

    def _settings(self, step: ReflectionStep) -> GenerationSettings:
        c = self.config
        return GenerationSettings(
            max_new_tokens=step.max_new_tokens or c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=c.oracle_seed,
            stop=step.stop,
        )

    def _generate_cached(self, template: ReflectionTemplate, step: ReflectionStep, conversations: list) -> list[dict]:
        """Serve cached records; send all misses of this batch to the oracle in one call; store them durably."""
        settings = self._settings(step)
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
        self.cache.refresh()
        hits = sum(k in self.cache for k in keys)
        self._stats.cache_hits += hits
        self._stats.cache_misses += len(keys) - hits
        missing = [k for k in by_key if k not in self.cache]
        while missing:
            mine = [k for k in missing if self.cache.try_claim(k)]
            self.cache.refresh()  # another writer may have stored a key between our look and our claim
            for k in [k for k in mine if k in self.cache]:
                self.cache.release(k)
            mine = [k for k in mine if k not in self.cache]
            theirs = [k for k in missing if k not in mine and k not in self.cache]
            if mine:
                try:
                    self._call_oracle(mine, [by_key[k] for k in mine], settings, template, step)
                finally:
                    for k in mine:
                        self.cache.release(k)
            self._stats.waited_for_other_writer += len(theirs)
            missing = self.cache.wait_for(theirs)  # keys whose owner died come back and are claimed again
        return [self.cache.get(k) for k in keys]

    def _call_oracle(self, keys, conversations, settings, template, step) -> None:
        oracle = self.oracle
        tokens_before = oracle.tokens_generated
        start = time.perf_counter()
        texts = oracle.generate(conversations, settings)
        elapsed = time.perf_counter() - start
        if len(texts) != len(conversations):
            raise RuntimeError(f"oracle returned {len(texts)} texts for {len(conversations)} prompts")
        self._stats.oracle_calls += 1
        self._stats.oracle_prompts += len(conversations)
        self._stats.oracle_tokens += oracle.tokens_generated - tokens_before
        self._stats.oracle_seconds += elapsed
        now = time.time()
        self.cache.put_many(
            [
                {"key": k, "raw": t, "phase": template.phase, "template": template.id, "step": step.name, "t": now}
                for k, t in zip(keys, texts)
            ]
        )

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
        columns: dict[str, list] = {}
        for start in range(0, len(dataset), batch_size):
            indices = report.valid_indices[start : start + batch_size]
            out = self(dataset[start : start + batch_size], indices=indices)
            for k, v in out.items():
                columns.setdefault(k, []).extend(v)
        self.close_progress()
        self.log_summary()
        return Dataset.from_dict(columns) if columns else Dataset.from_dict({})

    def close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def log_summary(self) -> None:
        s = self.stats()
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


def _boilerplate(step: ReflectionStep) -> str:
    """The template's own words around the data: an output that repeats them is an echo of the prompt."""
    return re.sub(r"\{\w+\}", " ", f"{step.system or ''}\n{step.user}")


def _row_columns(pair: Pair, outcome: dict[str, PhaseOutcome]) -> dict[str, Any]:
    ir, rr = outcome.get(INSTRUCTION_REFLECTION), outcome.get(RESPONSE_REFLECTION)
    final = (rr or ir).pair
    return {
        "recycled_instruction": final.instruction,
        "recycled_input": final.input,
        "recycled_output": final.output,
        "reflected_instruction": ir.pair.instruction if ir else None,
        "reflected_output": ir.pair.output if ir else None,
        "instruction_reflection_raw": ir.raw if ir else None,
        "response_reflection_raw": rr.raw if rr else None,
        "instruction_reflection_fallback": ir.reason if ir else None,
        "response_reflection_fallback": rr.reason if rr else None,
        "skip_reason": None,
    }
