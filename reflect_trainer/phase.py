"""One phase of Reflection-Tuning over a batch of pairs: a template's steps, each one prompt per pair, generated
through the cache (every miss of the batch in one oracle call per token budget), parsed into sections and judged by
the gates. A pair whose step fails keeps its input pair and the reason (a counted fallback).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

from .cache import RecycleCache, cache_key
from .formats import Pair
from .oracles import FINISH_ERROR, FINISH_UNKNOWN, Generation, GenerationSettings, Oracle, as_generation
from .parsing import PARSED_BUT_REJECTED, marker_regex, neutralize_markers, parse_step_output
from .recycling_stats import RecycleStats
from .structured import section_format_for
from .templates import END_MARKER, RESPONSE_REFLECTION, ReflectionStep, ReflectionTemplate, render, render_fields
from .text import ends_mid_sentence, request_text


@dataclass
class PhaseOutcome:
    pair: Pair  # the phase's result: the new pair, or the input pair when it fell back
    raw: str  # the oracle's texts for this phase, pre-fills included, steps separated by blank lines
    reason: str | None  # fallback reason, None when accepted
    finish: str = ""  # why the oracle stopped, per step ("stop", "length", ...), comma-separated


class PhaseRunner:
    """Runs phases for a :class:`~.recycler.Recycler`, which owns every argument.

    Args:
        config: the :class:`~.config.ReflectionConfig` (budgets, decoding, gates, structured output, thinking tags).
        cache: where generations are served from and stored, exactly once across processes.
        stats: the counters to add to.
        controls: decoding controls per phase, ``(repetition_penalty, no_repeat_ngram_size)``.
        chat_template_kwargs: extra chat-template variables (e.g. ``enable_thinking: false``).
        marker_names: every section marker of the templates in use (neutralised in the data).
        oracle: returns the oracle (loaded on first use, so a fully cached run never loads a model).
        oracle_identity: returns the oracle's identity, part of every cache key.
        tick: advances the progress bar by a number of pair-steps.
    """

    def __init__(self, config, cache: RecycleCache, stats: RecycleStats, controls: dict, chat_template_kwargs,
                 marker_names, oracle: Callable[[], Oracle], oracle_identity: Callable[[], str],
                 tick: Callable[[int], None]):
        self.config, self.cache, self._stats = config, cache, stats
        self.controls, self.chat_template_kwargs, self.marker_names = controls, chat_template_kwargs, marker_names
        self._oracle, self._oracle_identity, self._tick = oracle, oracle_identity, tick

    def run(self, template: ReflectionTemplate, inputs: list[Pair],
            stat_labels: list[str] | None = None) -> list[PhaseOutcome]:
        """``template``'s steps over ``inputs``: each pair's outcome (the new pair, or the input where it fell back,
        with the reason). ``stat_labels``: the counters' phase name per pair (default: the template's phase)."""
        labels = stat_labels or [template.phase] * len(inputs)
        fields = [{"instruction": p.instruction, "input": p.input, "output": p.output} for p in inputs]
        raws: list[list[str]] = [[] for _ in inputs]
        finishes: list[list[str]] = [[] for _ in inputs]
        reasons: list[str | None] = [None] * len(inputs)
        for step in template.steps:
            alive = [i for i in range(len(inputs)) if reasons[i] is None]
            if not alive:
                break
            prompts = {i: self.step_prompt(template, step, fields[i]) for i in alive}
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

    def step_prompt(self, template: ReflectionTemplate, step: ReflectionStep, pair_fields: dict[str, str]):
        """``(conversation, pre-filled section, its pre-filled body)`` of one step for one pair; the data's
        marker-like text neutralised."""
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
                    "oracle": self._oracle_identity(),
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
        oracle = self._oracle()
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


def _prefill_opener(step: ReflectionStep, prefill: str) -> tuple[str, int] | None:
    """``(section name, end offset)`` of the section marker a pre-fill starts with, if any."""
    opener = marker_regex(list(step.sections.values())).match(prefill)
    if not opener:
        return None
    name = next(n for n in step.sections.values() if re.fullmatch(
        r"\[\s*" + r"\s+".join(map(re.escape, n.split())) + r"\s*\]\s*:?\s*", opener.group(0), re.I))
    return name, opener.end()


def _boilerplate(step: ReflectionStep) -> str:
    """The template's own words around the data: an output that repeats them is an echo of the prompt."""
    return re.sub(r"\{\w+\}", " ", f"{step.system or ''}\n{step.user}")
