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

from .oracles import FINISH_LENGTH, FINISH_UNKNOWN

TRUNCATED = "truncated"
LOOP = "loop"
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
            answer's words. 0 turns the check off.
        require_complete_instruction: Instruction reflection: the new instruction must end a sentence and not on a
            dangling clause.
        reject_meta_commentary: Reject an answer that comments on itself, "the draft" or "the original response".
    """

    reject_truncated: bool = True
    loop_ngram: int = 8
    min_length_ratio: float = 1.0
    require_complete_instruction: bool = True
    reject_meta_commentary: bool = True


_WORD_RE = re.compile(r"\w+")
# A sentence is over when the text ends with one of these (after closing quotes, brackets, markdown emphasis).
_SENTENCE_END_RE = re.compile(r"[.!?…:;]?[.!?…][\"'”’)\]*_`]*\s*$|```\s*$|[.!?…][\"'”’)\]*_`]*\s*$")
# A line that is only a list marker ("1.", "2)", "-", "*") with nothing but punctuation or digits after it.
# ("---" is a markdown rule or table border, not an item.)
_EMPTY_ITEM_RE = re.compile(r"^\s*(?:\d+[.)]|[-*•])(?:\s+(?:\d+[.)]?\s*)*)?:?\s*$")
# Four or more list numbers in a row with nothing between them: "1. 1. 2. 3. 4."
_EMPTY_NUMBER_RUN_RE = re.compile(r"(?:(?<!\S)\d+[.)](?:\s+|$)){4,}")
# A request that ends on a clause promising what never comes: "... use the following steps", "... such as".
_DANGLING_RE = re.compile(r"(?:\bfollowing(?:\s+\w+){0,2}|\b(?:such as|including|like|as follows|below|e\.g\.?))"
                          r"\s*[:.]?\s*$", re.I)
# Words a complete sentence does not end on: articles, prepositions, conjunctions, auxiliaries, pronouns.
_FUNCTION_WORDS = frozenset(
    "a an the and or but nor of to in on at by for with from into about as than that which who whose whom your you "
    "my our their its his her can could should would will may might must shall is are was were be been being do does "
    "did have has had if when while because so such this these those some any each every".split())


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def ends_mid_sentence(text: str) -> bool:
    """True when the text does not end a sentence (or a code block): what a budget cut leaves behind."""
    stripped = text.rstrip()
    if not stripped:
        return True
    return not _SENTENCE_END_RE.search(stripped)


def is_truncated(finish_reason: str, section_closed: bool, value: str) -> bool:
    """The section ran into the budget: generation stopped on ``length`` while the section was still open, or on
    ``length`` with the section ending mid-sentence (a small oracle that restarts a section writes its marker again
    mid-text: the first copy is "closed" by the second, yet cut). An engine that does not report a finish reason
    (``unknown``) is judged by the text: an open section that ends mid-sentence."""
    if finish_reason == FINISH_LENGTH:
        return not section_closed or ends_mid_sentence(value)
    return finish_reason == FINISH_UNKNOWN and not section_closed and ends_mid_sentence(value)


def repeated_phrase(text: str, n: int) -> str | None:
    """The first run of ``n`` words said again within the next ``2n`` words — a decoder going round in circles — or
    None. Good long answers repeat phrases far apart ("the play is stopped and a face off ..." in two paragraphs);
    loops repeat them back to back."""
    tokens = words(text)
    last_seen: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in last_seen and i - last_seen[gram] <= 2 * n:
            return " ".join(gram)
        last_seen[gram] = i
    return None


def counts_without_content(text: str) -> bool:
    """An enumeration that counts without saying anything: "1. 1. 2. 3. 4." or several empty list items."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    empty_items = sum(bool(_EMPTY_ITEM_RE.match(ln)) for ln in lines)
    if empty_items >= 3:
        return True
    return bool(_EMPTY_NUMBER_RUN_RE.search(text))


_LIST_MARKER_RE = re.compile(r"^\s*(?:\d+[.)]|[-*•#]+)\s*")


def repeated_line(text: str, times: int = 3) -> bool:
    """The same line (list numbering aside, at least three words) said ``times`` times: '1. The answer is: "Drake"',
    '2. The answer is: "Drake"', ... — a loop in list form, too short for the n-gram window."""
    lines = [" ".join(words(_LIST_MARKER_RE.sub("", ln))) for ln in text.splitlines() if ln.strip()]
    run = 1
    for previous, line in zip(lines, lines[1:]):  # back to back, as loops repeat (lyrics and tables repeat apart)
        run = run + 1 if line == previous and len(line.split()) >= 3 else 1
        if run >= times:
            return True
    return False


def repeated_paragraph(text: str, n: int, share: float = 0.6, min_words: int = 8) -> bool:
    """A paragraph that mostly says the previous one again (``share`` of its word ``n``-grams were in it): a loop
    too far apart for :func:`repeated_phrase`, with a word changed here and there. Back to back only: a song's
    chorus or a program's repeated block comes back further away (B9: 1 of 805 good answers caught at n=8, against 8
    if any earlier paragraph counted)."""
    previous: set[tuple[str, ...]] = set()
    for paragraph in re.split(r"\n\s*\n", text):
        tokens = words(paragraph)
        grams = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
        if len(tokens) >= min_words and grams and len(grams & previous) >= share * len(grams):
            return True
        previous = grams
    return False


def has_loop(text: str, ngram: int) -> bool:
    return (counts_without_content(text) or repeated_line(text)
            or (ngram > 0 and (repeated_phrase(text, ngram) is not None or repeated_paragraph(text, ngram))))


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
    last = words(stripped)[-1:] or [""]
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
        if len(words(value)) < gates.min_length_ratio * len(words(original)):
            return SHORTER_THAN_ORIGINAL
    return None
