"""Acceptance gates: a parsed rewrite replaces the original only if it is complete, not degenerate and not shorter.

Parsing (``parsing.py``) finds the marked sections and rejects outputs that are not rewrites at all (no section,
placeholder, echo). The gates here reject rewrites that *are* rewrites but would teach the student something bad:

* ``truncated``: the section that becomes training text ran into the token budget (it ends mid-sentence);
* ``loop``: repetition inside the output — a phrase said again word for word, an enumeration that counts without
  content (``1. 2. 3. ...``) — not only whole-output loops;
* ``shorter_than_original`` (response reflection): a "better answer" much shorter than the answer it replaces (the
  method asks the oracle for *more* detail);
* ``incomplete_instruction`` (instruction reflection): a new instruction that is cut off or ends on a dangling
  clause ("... use the following steps");
* ``meta_commentary``: an answer that talks about itself or the draft it rewrites ("This is a more accurate and
  detailed response", "In this response, I've added ...", "The original draft was too simplistic"). The student
  never sees the draft, so it would learn to comment on an answer nobody gave; and such a rewrite is usually the
  original answer with the comment appended (11 of the 12 response rewrites SmolLM2-135M had accepted on the demo's
  34 pairs were that).

Like parsing, the gates run when a cached raw text is *read*: changing a threshold needs no regeneration. Defaults
were chosen by measurement (``benchmarks/b9_gates.py``): on the 805 GPT-4-Turbo answers of AlpacaEval, read as if they
were rewrites, the defaults reject 7 (0.9%) as loops (song lyrics, lists that repeat a phrase back to back; n=6
would reject 1.6%, n=5 2.6%), none as counting without content, none as meta-commentary, and 13 of the 805
*instructions* (1.6%) as incomplete ("... and who they belonged to"). Cut at half their length with finish reason
``length``, all 805 are ``truncated``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The text rules live in .text; imported here under the names the gates have always had.
from .text import (LOOP, counts_without_content, ends_mid_sentence, has_loop, is_truncated,  # noqa: F401
                   match_words, repeated_line, repeated_paragraph, repeated_phrase, word_count)

TRUNCATED = "truncated"
SHORTER_THAN_ORIGINAL = "shorter_than_original"
INCOMPLETE_INSTRUCTION = "incomplete_instruction"
META_COMMENTARY = "meta_commentary"
GATE_REASONS = (TRUNCATED, LOOP, SHORTER_THAN_ORIGINAL, INCOMPLETE_INSTRUCTION, META_COMMENTARY)


@dataclass(frozen=True)
class AcceptanceGates:
    """Thresholds of the gates (``ReflectionConfig`` fields of the same names set them).

    Args:
        reject_truncated: Reject a section cut by the token budget.
        loop_ngram: A run of this many words that occurs twice in one output is a loop. 0 turns the check off
            (whole-output loops are still caught by the parser).
        min_length_ratio: Response reflection: the better answer must have at least this share of the original
            answer's words (:func:`reflect_trainer.text.word_count`: whitespace-separated). 0 turns the check off.
        require_complete_instruction: Instruction reflection: the new instruction must end a sentence and not on a
            dangling clause.
        reject_meta_commentary: Reject an answer that comments on itself, "the draft" or "the original response".
    """

    reject_truncated: bool = True
    loop_ngram: int = 8
    min_length_ratio: float = 1.0
    require_complete_instruction: bool = True
    reject_meta_commentary: bool = True


# A request that ends on a clause promising what never comes: "... use the following steps", "... such as".
_DANGLING_RE = re.compile(r"(?:\bfollowing(?:\s+\w+){0,2}|\b(?:such as|including|like|as follows|below|e\.g\.?))"
                          r"\s*[:.]?\s*$", re.I)
# Words a complete sentence does not end on: articles, prepositions, conjunctions, auxiliaries, pronouns.
_FUNCTION_WORDS = frozenset(
    "a an the and or but nor of to in on at by for with from into about as than that which who whose whom your you "
    "my our their its his her can could should would will may might must shall is are was were be been being do does "
    "did have has had if when while because so such this these those some any each every".split())


#: Compared words (lower-cased ``\w+`` runs), the name the parser and the gates used; counts use ``word_count``.
words = match_words


_REFERENT = r"(?:answer|response|reply|draft|version|prompt|text|sentence|message|alternative|revision|rewrite)"
# Phrases that refer to the answer being written, or to the draft it replaces, rather than to the user's request.
# Kept narrow on purpose: none of them occurs in AlpacaEval's 805 GPT-4 answers (benchmarks/b9_gates.py), while
# "draft" alone does (8, "Draft a speech"), as do "the above text" and "This is an alternative".
_META_COMMENTARY_RE = re.compile("|".join([
    r"\bthe draft\b|\bdraft (?:reply|answer|response)\b",
    r"\b(?:the|my|your) (?:original|previous|initial|revised|improved|updated) " + _REFERENT + r"s?\b",
    r"\b(?:in|with|from) this (?:response|answer|reply|revision|rewrite)\b",
    r"\bthis is an? (?:more|much|better|great|good|improved|revised)\b[\w ,-]{0,60}? (?:" + _REFERENT
    + r"|example of how)\b",
    r"\ba better (?:alternative|answer|response|reply|version)\b",
    r"\b(?:the|this|my) (?:answer|response|reply|version) (?:is|provides) (?:a |an )?(?:more|much|better)\b",
    r"\bI(?:'ve| have)? (?:added|made a few|made some|changed|revised|rephrased|rewrote|improved|rewritten)\b",
    r"\bI(?:'ll| will) make sure to be\b",
]), re.I)


def meta_commentary(text: str) -> str | None:
    """The first phrase in which the text talks about itself or the draft it rewrites, or None."""
    match = _META_COMMENTARY_RE.search(text)
    return match.group(0) if match else None


def instruction_is_complete(text: str) -> bool:
    """A complete request does not stop on a comma, a colon, a function word ("... and the", "... you can") or a
    clause that promises what never comes ("... use the following steps"). Final punctuation is not required: a
    third of AlpacaEval's own instructions have none ("How do I dice without slicing my finger")."""
    stripped = text.strip().strip("*_ ")
    if not stripped or stripped.endswith((":", ",", ";", "(", "-", "—")):
        return False
    if _DANGLING_RE.search(stripped):
        return False
    if stripped.endswith(("?", "!", ".", ")", '"', "”")):
        return True  # "What should I build a cabin out of?" ends on a preposition, and is complete
    last = match_words(stripped)[-1:] or [""]
    return last[0] not in _FUNCTION_WORDS


def judge_rewrite(gates: AcceptanceGates, *, value: str, generated_part: str, section_closed: bool,
                  finish_reason: str, original: str, kind: str) -> str | None:
    """Why a parsed field must not replace the original, or None. ``kind``: ``"instruction"``, ``"answer"`` (an
    answer to a new instruction) or ``"better_answer"`` (a rewrite of ``original``, which it must not shorten)."""
    if gates.reject_truncated and is_truncated(finish_reason, section_closed, generated_part):
        return TRUNCATED
    if has_loop(generated_part, gates.loop_ngram):
        return LOOP
    if kind == "instruction" and gates.require_complete_instruction and not instruction_is_complete(value):
        return INCOMPLETE_INSTRUCTION
    if kind != "instruction" and gates.reject_meta_commentary and meta_commentary(generated_part):
        return META_COMMENTARY
    if kind == "better_answer" and gates.min_length_ratio > 0:
        if word_count(value) < gates.min_length_ratio * word_count(original):
            return SHORTER_THAN_ORIGINAL
    return None
