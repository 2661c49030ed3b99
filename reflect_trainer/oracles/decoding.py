"""Decoding controls against repetition, shared by the local engines: the same rule whatever runs the oracle.

Both count the oracle's *output* only, never the prompt: reflection often has to copy the original's words (a better
answer keeps what was right in the draft), and a penalty on the prompt's tokens would push a small oracle into
paraphrase. What they fight is a decoder going round in circles in what it writes itself.

* ``repetition_penalty`` (CTRL, Keskar et al. 2019): the logit of a token already in the output is divided by the
  penalty when positive, multiplied when negative. transformers: ``RepetitionPenaltyLogitsProcessor`` with the
  prompt ignored; llama.cpp: its ``penalties`` sampler, which sees only the tokens sampled (the prompt is never
  accepted into it). vLLM and HTTP servers apply their own ``repetition_penalty`` / ``repeat_penalty``, which also
  counts prompt tokens (vLLM) or the last 64 tokens of the context (llama.cpp's server).
* ``no_repeat_ngram_size`` n: a token that would complete a run of n tokens already written is banned (its logit set
  to -inf). transformers: :class:`OutputNoRepeatNGram`; llama.cpp: the same rule (:func:`banned_tokens`) in the
  engine's sampling loop. vLLM and HTTP servers have no such option: asking for it there is an error.
"""

from __future__ import annotations

NO_REPEAT_UNSUPPORTED = ("no_repeat_ngram_size={n}: the {engine} engine has no no-repeat n-gram option (vLLM and "
                         "OpenAI-compatible servers offer none); set oracle_no_repeat_ngram_size=0 and use "
                         "oracle_repetition_penalty, or the transformers or llama_cpp engine")


#: ``(repetition_penalty, no_repeat_ngram_size)`` per phase that ``None`` ("auto") stands for with the compact
#: templates, i.e. a small oracle (the embedded SmolLM2-135M), chosen by measurement (``benchmarks/b11_decoding.py``,
#: the demo's 34 pairs). Instruction reflection writes new text, where greedy decoding loops: a penalty of 1.2 took
#: its acceptance from 24% to 56%. Response reflection improves a draft: there the same penalty took acceptance from
#: 35% down to 26% (the oracle copies the draft instead of looping, an echo), so it stays off. No-repeat 4 reached
#: 38% / 38% on 16 pairs, added nothing on top of the penalty, and turns a loop into a paraphrase of it that the loop
#: gate cannot see ("Drake", "Drax", "Dragon", "Drac"): off.
SMALL_ORACLE_CONTROLS = {"instruction_reflection": (1.2, 0), "response_reflection": (1.0, 0)}
NO_REPEAT_ENGINES = ("transformers", "self", "llama_cpp")


def resolve_controls(repetition_penalty: float | None, no_repeat_ngram_size: int | None, engine: str,
                     compact_templates: bool, phase: str) -> tuple[float, int]:
    """``(repetition_penalty, no_repeat_ngram_size)`` for ``phase``: what ``None`` means; a set value always wins.

    A small oracle writing with the compact templates loops under greedy decoding, and a looping rewrite is
    rejected; a strong oracle with the paper's templates does not, and code or lists repeat n-grams legitimately,
    so there both controls stay off. An engine without a no-repeat option gets the penalty alone."""
    auto = SMALL_ORACLE_CONTROLS[phase] if compact_templates else (1.0, 0)
    if engine not in NO_REPEAT_ENGINES:
        auto = (auto[0], 0)
    return (auto[0] if repetition_penalty is None else repetition_penalty,
            auto[1] if no_repeat_ngram_size is None else no_repeat_ngram_size)


def banned_tokens(output: list[int], n: int) -> set[int]:
    """Tokens that would complete an ``n``-gram already present in ``output`` (the oracle's tokens so far)."""
    if n <= 0 or len(output) < n:
        return set()
    if n == 1:
        return set(output)
    prefix = tuple(output[len(output) - n + 1:])
    return {output[i + n - 1] for i in range(len(output) - n + 1) if tuple(output[i:i + n - 1]) == prefix}


def transformers_processors(prompt_length: int, repetition_penalty: float, no_repeat_ngram_size: int) -> list:
    """The logits processors of the two controls for ``model.generate`` (empty when both are off); the prompt (left
    padded to ``prompt_length``) is not counted."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    processors: list = []
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=prompt_length))
    if no_repeat_ngram_size > 0:
        processors.append(OutputNoRepeatNGram(prompt_length, no_repeat_ngram_size))
    return processors


class OutputNoRepeatNGram:
    """transformers logits processor: no ``n``-gram twice in the generated tokens (``input_ids[:, prompt_length:]``).

    transformers' own ``no_repeat_ngram_size`` counts the prompt too, which forbids copying any three words of the
    draft being improved."""

    def __init__(self, prompt_length: int, n: int):
        self.prompt_length, self.n = prompt_length, n

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            banned = banned_tokens(ids, self.n)
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores
