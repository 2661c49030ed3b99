"""Parse the oracle's marked sections and reject degenerate output.

Parsing is applied when a cached raw text is *read*, never stored, so a parser fix needs no regeneration.

Trust boundary: only the text the oracle generated is searched for markers. The pre-filled opener is ours, and the
original data reach the oracle only through :func:`neutralize_markers`, so marker-like text in a data set can
neither open nor close a section, even if the oracle echoes it. Neutralisation is reversible: the parsed field values
go through :func:`restore_markers`, so a user's ``v[end]`` comes back as ``v[end]``. The reversal runs after the
sections are split, so it cannot forge one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .gates import GATE_REASONS, TRUNCATED, AcceptanceGates, judge_rewrite
from .oracles import FINISH_LENGTH, FINISH_UNKNOWN
from .text import LOOP, _ngrams, has_loop, is_truncated, whole_output_loop
from .text import match_words as _words  # one word splitter for the parser's checks and the gates
from .thinking import DEFAULT_THINKING_TAGS, THINKING_TRUNCATED, split_thinking

# Fallback reasons, recorded per phase. Everything but these means "parsed and accepted".
NO_SECTION = "no_section"
EMPTY = "empty"
PLACEHOLDER = "placeholder"
ECHO_ORIGINAL = "echo_original"
ECHO_PROMPT = "echo_prompt"
TOO_SHORT = "too_short"
UNPARSED_REASONS = (NO_SECTION, EMPTY, PLACEHOLDER, THINKING_TRUNCATED)  # the output had no usable section at all
DEGENERATE_REASONS = (LOOP, ECHO_ORIGINAL, ECHO_PROMPT, TOO_SHORT)  # a section, but not an improvement
GATED_REASONS = tuple(r for r in GATE_REASONS if r != LOOP)  # a section, but cut off, shorter or incomplete
PARSED_BUT_REJECTED = DEGENERATE_REASONS + GATED_REASONS  # the output had its section; the gates said no

_EMPTY_VALUES = {"", "n/a", "na", "none", "null", "-", "...", "…"}


def _marker_pattern(name: str) -> str:
    words = r"\s+".join(re.escape(w) for w in name.split())
    # [Name], [ Name ]:, **[Name]**, ## [Name], **Name**:, **Name:** — what small models actually write.
    bracketed = rf"\[\s*{words}\s*\]"
    bold = rf"\*\*\s*{words}\s*(?::\s*)?\*\*"  # not \s*:?\s*: two adjacent \s* are quadratic on long blanks
    return rf"(?:{bracketed}|{bold})(?:\*\*)?[ \t]*:?"


def marker_regex(names: list[str]) -> re.Pattern:
    """One regex for all markers; group ``m{i}`` matches ``names[i]`` (pass longest first)."""
    return re.compile("|".join(f"(?P<m{i}>{_marker_pattern(n)})" for i, n in enumerate(names)), re.IGNORECASE | re.M)


#: Inserted after the opener (``[`` or ``**``) of marker-like text in data: ``[End]`` becomes ``[‹End]``, which no
#: marker pattern matches. Visible on purpose: a model copies it instead of "repairing" it into a real marker.
NEUTRAL = "\u2039"
#: The markers of the built-in templates (and ``End``); a recycler adds its custom templates' section names.
BUILTIN_MARKER_NAMES = ("New Instruction", "Better Answer", "New Answer", "End")


@lru_cache(maxsize=64)
def _neutralize_regex(names: tuple[str, ...]) -> re.Pattern:
    words = "|".join(r"\s+".join(map(re.escape, n.split())) for n in sorted(set(names), key=len, reverse=True))
    # Two cases, one pass, linear time (no nested repetition; each opener looks ahead over one run of blanks):
    # * a run of NEUTRAL right after ``[`` or ``*`` already in the data gets one more, so the escape is reversible;
    # * an opener followed by a marker name gets one NEUTRAL after it.
    return re.compile(rf"(?<=[\[*]){NEUTRAL}+|(?:\[|\*\*)(?=\s*(?:{words})(?!\w))", re.IGNORECASE)


_RESTORE_RE = re.compile(rf"(?<=[\[*]){NEUTRAL}")


def neutralize_markers(text: str, names: tuple[str, ...] | list[str] = BUILTIN_MARKER_NAMES) -> str:
    """Make marker-like text in *data* inert before it is put into a prompt: ``[End]`` becomes ``[‹End]``.

    ``names``: every section name of the templates in use (``End`` is always added). Undone by
    :func:`restore_markers`: ``restore_markers(neutralize_markers(s, names)) == s`` for every string ``s``.
    """
    return _neutralize_regex(tuple(names) + ("End",)).sub(lambda m: m.group(0) + NEUTRAL, text)


def restore_markers(text: str) -> str:
    """Undo :func:`neutralize_markers` (needs no names: one NEUTRAL goes from every run after ``[`` or ``*``). Apply
    it to parsed field values only, never to text that is still to be split into sections."""
    return _RESTORE_RE.sub("", text)


def has_marker_like_text(text: str, names: tuple[str, ...] | list[str] = BUILTIN_MARKER_NAMES) -> bool:
    return _neutralize_regex(tuple(names) + ("End",)).search(text) is not None


@dataclass
class ParseResult:
    """What one oracle output yields: the fields it fills, or why it falls back."""

    fields: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # None: parsed and accepted

    @property
    def ok(self) -> bool:
        return self.reason is None


def _clean(text: str) -> str:
    text = text.strip()
    # Bold or quotes wrapped around the whole section.
    for left, right in (("**", "**"), ('"', '"'), ("“", "”")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left) : -len(right)].strip()
    return text.strip(" \t\n*#:")


def is_empty_field(text: str) -> bool:
    """A section with nothing usable in it: blank, markup only (``**``, ``#``, ``:``) or a filler ("N/A", "...").
    The structured-output processor asks the same question before it lets a section close."""
    return _clean(text).lower().strip(" .") in _EMPTY_VALUES


def split_sections(
    generated: str, sections: dict[str, str], end_marker: str = "End", open_section: str | None = None
) -> dict[str, str]:
    """Return ``{marker name: raw content}`` for the sections found in ``generated``.

    A section runs from its marker to ``[End]``, to the next known marker, or to the end of the text (small models
    often omit ``[End]``). ``open_section`` is a marker already opened by the pre-filled text. The first non-empty
    occurrence of each marker wins: it is what the oracle wrote before any looping.
    """
    spans = section_spans(generated, sections, end_marker, open_section)
    return {name: content for name, (content, _) in spans.items()}


def section_spans(
    generated: str, sections: dict[str, str], end_marker: str = "End", open_section: str | None = None
) -> dict[str, tuple[str, bool]]:
    """Like :func:`split_sections`, with whether each section was *closed* (by ``[End]`` or the next marker) rather
    than running to the end of the text — a section that runs to the end may have been cut by the token budget."""
    names = list(sections.values())
    ordered = sorted(set(names + [end_marker]), key=len, reverse=True)
    regex = marker_regex(ordered)
    hits = [(m.start(), m.end(), ordered[int(m.lastgroup[1:])]) for m in regex.finditer(generated)]

    def content_from(pos: int, name: str) -> tuple[str, bool]:
        # Closed means ended by [End] or by another section's marker. The same marker again is no end: the oracle
        # started the section over (a small model's restart), so the text before it may stop anywhere.
        stop = next(((start, other) for start, _, other in sorted(hits) if start >= pos), None)
        if stop is None:
            return generated[pos:], False
        return generated[pos : stop[0]], stop[1] != name

    found: dict[str, tuple[str, bool]] = {}
    if open_section is not None:
        found[open_section] = content_from(0, open_section)
    for _, end, name in hits:
        if name != end_marker and (name not in found or not _clean(found[name][0])):
            found[name] = content_from(end, name)
    return found


#: The whole-output check of the one loop detector (:func:`reflect_trainer.text.has_loop`), under its old name.
is_loop = whole_output_loop


def copied_fraction(text: str, source: str, n: int = 4) -> float:
    """Share of ``text``'s word n-grams that also occur in ``source``."""
    words = _words(text)
    if len(words) < n:
        return 1.0 if words and " ".join(words) in " ".join(_words(source)) else 0.0
    grams = _ngrams(words, n)
    source_grams = set(_ngrams(_words(source), n))
    return sum(g in source_grams for g in grams) / len(grams)


def _starts_with_prompt_label(text: str, boilerplate: str) -> bool:
    labels = re.findall(r"(?m)^\s*([A-Za-z][\w ]{0,30}):", boilerplate)
    head = _clean(text).lower()
    return any(head.startswith(label.strip().lower() + ":") for label in labels)


def judge_field(
    generated_part: str,
    original: str,
    boilerplate: str,
    placeholders: tuple[str, ...],
    prompt: str = "",
    loop_ngram: int = 0,
) -> str | None:
    """Return why a parsed field is unusable, or None when it is accepted.

    ``generated_part`` is what the oracle wrote for this field (without any pre-filled text: a pre-filled copy of
    the original is ours, not an echo), ``original`` the field it would replace, ``boilerplate`` the template text
    around the data (an echo of it means the oracle repeated its instructions), ``prompt`` the whole prompt as sent.
    ``loop_ngram``: the gates' n-gram window for :func:`reflect_trainer.text.has_loop` (0: whole-output loops only),
    so a loop is judged here as the gates judge it.
    """
    if is_empty_field(generated_part):
        return EMPTY
    norm = _clean(generated_part).lower().strip(" .")
    if any(norm == p.lower() or norm.startswith(p.lower()) for p in placeholders):
        return PLACEHOLDER
    if boilerplate and _starts_with_prompt_label(generated_part, boilerplate):
        return ECHO_PROMPT  # e.g. "Draft answer: ..." — the oracle is copying the prompt's layout
    if len(_words(generated_part)) < 3:
        return TOO_SHORT
    if has_loop(generated_part, loop_ngram):
        return LOOP
    if boilerplate and copied_fraction(generated_part, boilerplate, 3) >= 0.5:
        return ECHO_PROMPT
    if prompt and copied_fraction(generated_part, prompt) >= 0.8:
        return ECHO_PROMPT
    if copied_fraction(generated_part, original) >= 0.7:
        return ECHO_ORIGINAL  # a copy of the field it should improve, at most lightly edited
    return None


def parse_step_output(
    generated: str,
    sections: dict[str, str],
    prefill_section: str | None,
    prefill_body: str,
    originals: dict[str, str],
    boilerplate: str,
    placeholders: tuple[str, ...] = (),
    prompt: str = "",
    finish_reason: str = FINISH_UNKNOWN,
    gates: AcceptanceGates | None = None,
    rewrites_answer: bool = False,
    thinking_tags: tuple[str, str] | list[str] | None = DEFAULT_THINKING_TAGS,
) -> ParseResult:
    """Parse one step's generated text into pair fields, then apply the acceptance gates. Never raises on any text.

    ``finish_reason`` is why the oracle stopped (``stop``, ``length``, ...); ``gates`` the thresholds (``None``:
    parsing and degeneracy checks only); ``rewrites_answer``: the ``output`` section replaces ``originals["output"]``
    (response reflection), so it must not be much shorter. ``thinking_tags``: a reasoning oracle's leading thinking
    block is cut off first (see :mod:`reflect_trainer.thinking`), so neither the fields nor the gates see it; an
    output that ends inside it with finish reason ``length`` falls back as ``thinking_truncated``.
    """
    thought = split_thinking(generated, thinking_tags)
    if not thought.closed and finish_reason == FINISH_LENGTH:
        return ParseResult(reason=THINKING_TRUNCATED)  # the budget ran out before the answer started
    generated = thought.answer
    try:
        raw = section_spans(generated, sections, open_section=prefill_section)
    except Exception:  # noqa: BLE001 — the parser must never take a run down; an odd text is a fallback
        return ParseResult(reason=NO_SECTION)
    result = ParseResult()
    for field_name, marker in sections.items():
        if marker not in raw:
            return ParseResult(reason=NO_SECTION)
        generated_part, closed = raw[marker]
        # The pre-fill and the oracle's echoes carry neutralised data: restore the user's text, after the split.
        value = restore_markers(_clean((prefill_body if marker == prefill_section else "") + generated_part))
        reason = None
        if gates is not None and gates.reject_truncated and is_truncated(finish_reason, closed, generated_part):
            reason = TRUNCATED  # first: a text cut by the budget is cut, whatever else it resembles
        reason = reason or judge_field(generated_part, originals.get(field_name, ""), boilerplate, placeholders,
                                       prompt, loop_ngram=gates.loop_ngram if gates is not None else 0)
        if reason is None and gates is not None:
            kind = ("instruction" if field_name == "instruction"
                    else "better_answer" if rewrites_answer else "answer")
            reason = judge_rewrite(gates, value=value, generated_part=generated_part, section_closed=closed,
                                   finish_reason=finish_reason, original=originals.get(field_name, ""), kind=kind)
        if reason is not None:
            return ParseResult(reason=reason)
        result.fields[field_name] = value
    return result
