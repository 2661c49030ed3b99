"""Text rules every layer shares: how words are counted, how a request is joined, what a loop is, when a text was cut.

One owner per rule, so that the parser, the gates, the report and the demo data set cannot disagree about them.
"""

from __future__ import annotations

import re
from collections import Counter

from .oracles import FINISH_LENGTH, FINISH_UNKNOWN

LOOP = "loop"  # the fallback reason of :func:`has_loop`, for the parser and the gates alike


def word_count(text: str) -> int:
    """Words as a reader counts them: runs of non-blank characters (``str.split()``).

    The one count behind every length in the package: the ``shorter_than_original`` gate (``min_length_ratio``), the
    report's lengths and length ratios, and the demo data set's ``max_answer_words``. "state-of-the-art" is one word
    and so is "e.g.", as in a word processor; punctuation-separated runs (the old gate's ``\\w+`` count made
    "state-of-the-art" four words) would let a rewrite full of hyphens and numbers ("3.5", "1-2") count as longer.
    """
    return len(text.split())


_TOKEN_RE = re.compile(r"\w+")


def match_words(text: str) -> list[str]:
    """Lower-cased ``\\w+`` runs: what two texts are *compared* on (n-grams of loops and echoes, a last word).

    Not a count of words (see :func:`word_count`): punctuation and case must not hide a repeated phrase.
    """
    return _TOKEN_RE.findall(text.lower())


def request_text(instruction: str, input_: str | None = "") -> str:
    """An Alpaca pair's request as one text: the instruction, a blank line, the input (if any).

    The paper's pre-processing, and how the package shows an ``input`` everywhere it has no field of its own (chat
    messages, the oracle's originals, the report, the export, the student's scores).
    """
    return instruction + (f"\n\n{input_}" if input_ else "")


# ---- truncation --------------------------------------------------------------------------------------------------
# A sentence is over when the text ends with one of these (after closing quotes, brackets, markdown emphasis).
_SENTENCE_END_RE = re.compile(r"[.!?…:;]?[.!?…][\"'”’)\]*_`]*\s*$|```\s*$|[.!?…][\"'”’)\]*_`]*\s*$")


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


# ---- loops -------------------------------------------------------------------------------------------------------
# A line that is only a list marker ("1.", "2)", "-", "*") with nothing but punctuation or digits after it.
# ("---" is a markdown rule or table border, not an item.)
_EMPTY_ITEM_RE = re.compile(r"^\s*(?:\d+[.)]|[-*•])(?:\s+(?:\d+[.)]?\s*)*)?:?\s*$")
# Four or more list numbers in a row with nothing between them: "1. 1. 2. 3. 4."
_EMPTY_NUMBER_RUN_RE = re.compile(r"(?:(?<!\S)\d+[.)](?:\s+|$)){4,}")
_LIST_MARKER_RE = re.compile(r"^\s*(?:\d+[.)]|[-*•#]+)\s*")


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def whole_output_loop(text: str) -> bool:
    """The whole output goes round in circles: few distinct 4-grams, one line said over and over, or counting and
    symbols with no prose at all. The typical failure of a small greedy decoder; checked whatever ``loop_ngram``."""
    tokens = match_words(text)
    if len(tokens) < 12:
        return False
    if sum(w.isalpha() for w in tokens) < 0.3 * len(tokens):
        return True  # counting or symbol runs ("1. 2. 3. 4. ...") — no prose at all
    grams = _ngrams(tokens, 4)
    if len(set(grams)) / len(grams) < 0.55:
        return True
    lines = [ln.strip().lower() for ln in text.splitlines() if ln.strip()]
    counts = Counter(lines)
    return bool(counts) and counts.most_common(1)[0][1] >= 4 and len(lines) >= 6


def repeated_phrase(text: str, n: int) -> str | None:
    """The first run of ``n`` words said again within the next ``2n`` words — a decoder going round in circles — or
    None. Good long answers repeat phrases far apart ("the play is stopped and a face off ..." in two paragraphs);
    loops repeat them back to back."""
    tokens = match_words(text)
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
    if sum(bool(_EMPTY_ITEM_RE.match(ln)) for ln in lines) >= 3:
        return True
    return bool(_EMPTY_NUMBER_RUN_RE.search(text))


def repeated_line(text: str, times: int = 3) -> bool:
    """The same line (list numbering aside, at least three words) said ``times`` times: '1. The answer is: "Drake"',
    '2. The answer is: "Drake"', ... — a loop in list form, too short for the n-gram window."""
    lines = [" ".join(match_words(_LIST_MARKER_RE.sub("", ln))) for ln in text.splitlines() if ln.strip()]
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
        tokens = match_words(paragraph)
        grams = set(_ngrams(tokens, n))
        if len(tokens) >= min_words and grams and len(grams & previous) >= share * len(grams):
            return True
        previous = grams
    return False


def has_loop(text: str, ngram: int = 0) -> bool:
    """The one loop detector: the parser and the gates both ask it (reason :data:`LOOP`).

    A whole-output loop (:func:`whole_output_loop`), counting without content, the same line back to back, and with
    ``ngram > 0`` (the gates' ``loop_ngram``) a run of ``ngram`` words or a paragraph said again back to back.
    """
    return (whole_output_loop(text) or counts_without_content(text) or repeated_line(text)
            or (ngram > 0 and (repeated_phrase(text, ngram) is not None or repeated_paragraph(text, ngram))))
