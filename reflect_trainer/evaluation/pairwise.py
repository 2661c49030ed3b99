"""Pairwise comparison of two models by a judge, in both orders, as in the paper's Vicuna evaluation.

Each question is judged twice: once with model A's answer shown first, once with the answers swapped. A judge that
simply prefers whichever answer comes first then produces a tie, not a win. The two verdicts combine by the paper's
rule: a *win* is two wins or a win and a tie; a *loss* is the mirror; anything else (tie–tie, win–loss) is a *tie*.

Judges also prefer longer answers, and recycled data makes answers much longer (the paper reports 3–4× more tokens).
So the summary adds two length-controlled views: the win rate on questions whose answers have about the same
length, and a logistic regression of the outcome on the length difference, read off at zero difference.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from ..oracles import Conversation, GenerationSettings, Oracle, as_generation

# Written in our own words, after the usual pairwise-judge layout (question, two delimited answers, a bracketed
# verdict). Short on purpose: it must fit a small judge's context together with two long answers.
JUDGE_SYSTEM = (
    "You are an impartial judge. You compare two AI assistants' answers to a user's question on helpfulness, "
    "relevance, accuracy and level of detail. The order of the answers and their length must not decide."
)
JUDGE_USER = (
    "[Question]\n{question}\n\n"
    "[Assistant A's answer]\n{answer_1}\n[End of Assistant A's answer]\n\n"
    "[Assistant B's answer]\n{answer_2}\n[End of Assistant B's answer]\n\n"
    "Which answer is better? Reply with [[A]] if Assistant A's is better, [[B]] if Assistant B's is better, "
    "or [[C]] for a tie."
)
# Pre-filled start of the judge's reply: even a 135M judge then writes a letter next, so its output parses.
JUDGE_PREFILL = "Verdict: [["
JUDGE_SETTINGS = GenerationSettings(max_new_tokens=4, temperature=0.0, stop=("]]",))

# Outcomes from model A's point of view.
WIN, TIE, LOSS, INVALID = "win", "tie", "loss", "invalid"
# Answers count as "about the same length" when the shorter is at least this fraction shorter than the longer.
LENGTH_TOLERANCE = 0.2


def judge_conversation(question: str, answer_1: str, answer_2: str) -> Conversation:
    """The judge's prompt with ``answer_1`` shown as Assistant A's and ``answer_2`` as Assistant B's."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(question=question, answer_1=answer_1, answer_2=answer_2)},
        {"role": "assistant", "content": JUDGE_PREFILL},
    ]


_VERDICT = re.compile(r"^\W*(A|B|C|TIE)\b", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"``, ``"C"`` (tie) from the judge's continuation of ``Verdict: [[``; ``None`` if unparseable.

    Only the first word counts: a judge that writes "B or A" has not decided, and counting any later letter would
    quietly turn noise into a verdict.
    """
    match = _VERDICT.match(text)
    if match is None:
        return None
    letter = match.group(1).upper()
    return "C" if letter == "TIE" else letter


def outcome_for_first(verdict: str | None) -> str:
    """The outcome for the answer shown first (as Assistant A) given a parsed verdict."""
    return {"A": WIN, "B": LOSS, "C": TIE, None: INVALID}[verdict]


def combine_outcomes(first: str, second: str) -> str:
    """Combine model A's outcomes in the two orders by the paper's rule (see the module docstring).

    A question with an invalid verdict in either order is ``invalid``: it is counted and reported, never guessed.
    """
    if INVALID in (first, second):
        return INVALID
    pair = {first, second}
    if pair in ({WIN}, {WIN, TIE}):
        return WIN
    if pair in ({LOSS}, {LOSS, TIE}):
        return LOSS
    return TIE  # tie–tie, or one win and one loss (the judge followed the position, not the content)


@dataclass
class Judgement:
    """Both verdicts on one question. ``raw_*`` is the judge's text after the pre-fill; ``ab``: model A's answer
    shown first; ``ba``: model B's answer shown first."""

    raw_ab: str
    raw_ba: str
    verdict_ab: str | None
    verdict_ba: str | None
    outcome: str


def judge_pairs(judge: Oracle, questions: list[str], answers_a: list[str], answers_b: list[str]) -> list[Judgement]:
    """Judge every question in both orders with one batched judge call, and combine the verdicts per question."""
    conversations = [judge_conversation(q, a, b) for q, a, b in zip(questions, answers_a, answers_b)]
    conversations += [judge_conversation(q, b, a) for q, a, b in zip(questions, answers_a, answers_b)]
    raw = [as_generation(g).text for g in judge.generate(conversations, JUDGE_SETTINGS)]
    n = len(questions)
    judgements = []
    for raw_ab, raw_ba in zip(raw[:n], raw[n:]):
        verdict_ab, verdict_ba = parse_verdict(raw_ab), parse_verdict(raw_ba)
        first = outcome_for_first(verdict_ab)
        # In the swapped order model A is shown second: its outcome is the mirror of the first-shown answer's.
        second = {WIN: LOSS, LOSS: WIN, TIE: TIE, INVALID: INVALID}[outcome_for_first(verdict_ba)]
        judgements.append(Judgement(raw_ab, raw_ba, verdict_ab, verdict_ba, combine_outcomes(first, second)))
    return judgements


def _score(outcome: str) -> float:
    return {WIN: 1.0, TIE: 0.5, LOSS: 0.0}[outcome]


def win_rate(outcomes: list[str]) -> float | None:
    """(wins + ties / 2) / valid questions, or ``None`` when no question has a valid outcome."""
    valid = [_score(o) for o in outcomes if o != INVALID]
    return sum(valid) / len(valid) if valid else None


def similar_length(len_a: int, len_b: int, tolerance: float = LENGTH_TOLERANCE) -> bool:
    """Whether two answers' lengths are within ``tolerance`` of the longer one (both empty counts as similar)."""
    return abs(len_a - len_b) <= tolerance * max(len_a, len_b)


def length_adjusted_win_rate(scores: list[float], length_diffs: list[float], l2: float = 1.0,
                             iterations: int = 100) -> tuple[float | None, float | None]:
    """Fit P(A beats B) = sigmoid(b0 + b1 * x) on x = length difference / its standard deviation, and return
    ``(sigmoid(b0), b1)``: the win rate predicted for answers of equal length, and the length slope.

    ``scores`` are soft targets (win 1, tie 0.5, loss 0). Newton's method on two parameters; the slope carries an
    L2 penalty so that a handful of questions perfectly separated by length still gives a finite fit (with ``l2``
    of 1 and 20 questions it shrinks the slope only a little).
    """
    n = len(scores)
    if n == 0:
        return None, None
    mean = sum(length_diffs) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in length_diffs) / n)
    # Not centred: x = 0 must mean "same length", which is where the intercept is read.
    xs = [d / std if std > 0 else 0.0 for d in length_diffs]
    b0 = b1 = 0.0
    for _ in range(iterations):
        ps = [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, b0 + b1 * x)))) for x in xs]
        g0 = sum(p - y for p, y in zip(ps, scores))
        g1 = sum((p - y) * x for p, y, x in zip(ps, scores, xs)) + l2 * b1
        ws = [p * (1.0 - p) for p in ps]
        h00 = sum(ws) + 1e-9  # all targets 1 (or 0) drive the weights to 0; the intercept then just keeps growing
        h01 = sum(w * x for w, x in zip(ws, xs))
        h11 = sum(w * x * x for w, x in zip(ws, xs)) + l2
        det = h00 * h11 - h01 * h01
        step0 = (h11 * g0 - h01 * g1) / det
        step1 = (h00 * g1 - h01 * g0) / det
        b0, b1 = b0 - step0, b1 - step1
        if abs(step0) < 1e-10 and abs(step1) < 1e-10:
            break
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, b0)))), b1


def summarize(judgements: list[Judgement], answers_a: list[str], answers_b: list[str]) -> dict:
    """Win/tie/loss counts for model A against model B, invalid verdicts, position bias and length control."""
    outcomes = [j.outcome for j in judgements]
    counts = Counter(outcomes)
    lengths = [(len(a), len(b)) for a, b in zip(answers_a, answers_b)]
    balanced = [o for o, (la, lb) in zip(outcomes, lengths) if similar_length(la, lb)]
    valid = [(o, la - lb) for o, (la, lb) in zip(outcomes, lengths) if o != INVALID]
    adjusted, slope = length_adjusted_win_rate([_score(o) for o, _ in valid], [float(d) for _, d in valid])
    raw_verdicts = [j.verdict_ab for j in judgements] + [j.verdict_ba for j in judgements]
    return {
        "questions": len(judgements),
        "win": counts[WIN],
        "tie": counts[TIE],
        "loss": counts[LOSS],
        "invalid_questions": counts[INVALID],
        "invalid_verdicts": sum(v is None for v in raw_verdicts),
        # How often each letter was given over both orders: a judge that says "A" twice per question is only
        # following the position (every such question becomes a tie).
        "verdict_letters": {k: raw_verdicts.count(k) for k in ("A", "B", "C")},
        "position_consistent": sum(
            j.verdict_ab is not None and j.verdict_ba is not None
            and outcome_for_first(j.verdict_ab) == {WIN: LOSS, LOSS: WIN, TIE: TIE}[outcome_for_first(j.verdict_ba)]
            for j in judgements
        ),
        "win_rate": win_rate(outcomes),
        "mean_chars_a": sum(la for la, _ in lengths) / len(lengths) if lengths else 0.0,
        "mean_chars_b": sum(lb for _, lb in lengths) / len(lengths) if lengths else 0.0,
        "length_balanced": {
            "tolerance": LENGTH_TOLERANCE,
            "questions": len(balanced),
            "win": balanced.count(WIN),
            "tie": balanced.count(TIE),
            "loss": balanced.count(LOSS),
            "win_rate": win_rate(balanced),
        },
        "length_adjusted_win_rate": adjusted,
        "length_slope": slope,
    }
