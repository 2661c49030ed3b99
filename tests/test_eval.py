"""`reflect-trainer eval`: pairwise judging in both orders, length control, and IFEval.

Model A is the embedded SmolLM2-135M-Instruct. Model B is the same base after a few real SFT steps (TRL's
SFTTrainer) on 4 real AlpacaEval pairs from the ``helpful_base`` subset, disjoint from the Vicuna questions judged:
the situation the command is for (one base, trained vs not, or on original vs recycled data), and a model that
really answers differently. The judge is the real SmolLM2; a scripted judge appears only in the unit tests of the
verdict parsing and combination.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from reflect_trainer.embedded import assets_home
from reflect_trainer.evaluation.ifeval import (
    VERIFIER_IMPORT_NAME,
    ifeval_prompts,
    load_verifier,
    score_ifeval,
    seeded_random,
)
from reflect_trainer.evaluation.pairwise import (
    INVALID,
    Judgement,
    LOSS,
    TIE,
    WIN,
    combine_outcomes,
    judge_pairs,
    length_adjusted_win_rate,
    parse_verdict,
    summarize,
)
from test_support.oracles import ScriptedOracle

# --- verdict parsing and combination (no model) ----------------------------------------------------------------


@pytest.mark.parametrize("text, verdict", [
    ("A]]", "A"), ("b]] because", "B"), ("C", "C"), (" tie]]", "C"), ("**B**", "B"),
    ("", None), ("Assistant A", None), ("D]]", None), ("AB", None),
])
def test_parse_verdict_reads_the_first_letter_and_flags_anything_else(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("first, second, combined", [
    (WIN, WIN, WIN), (WIN, TIE, WIN), (TIE, WIN, WIN),
    (LOSS, LOSS, LOSS), (LOSS, TIE, LOSS), (TIE, LOSS, LOSS),
    (TIE, TIE, TIE), (WIN, LOSS, TIE), (LOSS, WIN, TIE),
    (INVALID, WIN, INVALID), (TIE, INVALID, INVALID), (INVALID, INVALID, INVALID),
])
def test_combine_outcomes_follows_the_papers_both_orders_rule(first, second, combined):
    assert combine_outcomes(first, second) == combined


def _judge_by_rule(rule):
    """A scripted judge: ``rule(first_shown_answer, second_shown_answer) -> continuation text``."""
    def script(conversation):
        user = conversation[1]["content"]
        first = user.split("[Assistant A's answer]\n")[1].split("\n[End of Assistant A's answer]")[0]
        second = user.split("[Assistant B's answer]\n")[1].split("\n[End of Assistant B's answer]")[0]
        assert conversation[-1] == {"role": "assistant", "content": "Verdict: [["}
        return rule(first, second)
    return script


def test_judge_pairs_swaps_the_order_so_a_position_biased_judge_only_gives_ties():
    judge = ScriptedOracle(_judge_by_rule(lambda first, second: "A]]"))
    judgements = judge_pairs(judge, ["q1", "q2"], ["a1", "a2"], ["b1", "b2"])
    assert judge.calls == 1  # both orders of every question in one batched call
    assert [(j.verdict_ab, j.verdict_ba, j.outcome) for j in judgements] == [("A", "A", TIE)] * 2


def test_judge_pairs_credits_the_better_answer_in_either_position_and_counts_invalid_verdicts():
    # Prefers the answer containing "good"; says nothing usable when it sees "???".
    def rule(first, second):
        if "???" in first + second:
            return "I cannot decide"
        return "A]]" if "good" in first else "B]]" if "good" in second else "C]]"

    judge = ScriptedOracle(_judge_by_rule(rule))
    answers_a = ["good answer", "meh", "same", "???"]
    answers_b = ["meh", "a good one", "same", "fine"]
    judgements = judge_pairs(judge, ["q1", "q2", "q3", "q4"], answers_a, answers_b)
    assert [j.outcome for j in judgements] == [WIN, LOSS, TIE, INVALID]
    summary = summarize(judgements, answers_a, answers_b)
    assert (summary["win"], summary["tie"], summary["loss"]) == (1, 1, 1)
    assert (summary["invalid_questions"], summary["invalid_verdicts"]) == (1, 2)
    assert summary["win_rate"] == pytest.approx(0.5)  # (1 + 0.5) / 3 valid questions
    assert summary["position_consistent"] == 3


def test_length_adjusted_win_rate_removes_a_pure_length_preference():
    # A wins exactly when its answer is longer, and loses when it is shorter: no preference at equal length.
    diffs = [300.0, 200.0, 100.0, -100.0, -200.0, -300.0, 150.0, -150.0]
    scores = [1.0 if d > 0 else 0.0 for d in diffs]
    adjusted, slope = length_adjusted_win_rate(scores, diffs)
    assert adjusted == pytest.approx(0.5, abs=1e-6)
    assert slope > 1.0
    # Equal lengths: nothing to adjust, the prediction is the plain win rate.
    adjusted, _ = length_adjusted_win_rate([1.0, 1.0, 0.5, 0.0], [0.0] * 4)
    assert adjusted == pytest.approx(0.625, abs=1e-6)


def test_length_balanced_win_rate_counts_only_answers_within_20_percent():
    # Four questions: A wins the two where its answer is far longer, loses the two of similar length. The plain win
    # rate is 0.5; restricted to answers within 20% of the longer one, A won nothing.
    def judged(outcome):
        return Judgement(raw_ab="", raw_ba="", verdict_ab=None, verdict_ba=None, outcome=outcome)

    answers_a = ["x" * 1000, "x" * 900, "x" * 100, "x" * 85]
    answers_b = ["x" * 100, "x" * 200, "x" * 100, "x" * 100]  # 1000:100 and 900:200 differ; 85:100 is within 20%
    summary = summarize([judged(WIN), judged(WIN), judged(LOSS), judged(LOSS)], answers_a, answers_b)
    assert summary["win_rate"] == 0.5
    balanced = summary["length_balanced"]
    assert (balanced["questions"], balanced["win"], balanced["loss"], balanced["win_rate"]) == (2, 0, 2, 0.0)

# --- IFEval verifier, loaded from the wheel ---------------------------------------------------------------------


def _prompt(instruction_id: str, kwargs: dict) -> dict:
    return {"key": 1, "prompt": "handcrafted", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}


def test_ifeval_verifier_is_imported_from_the_wheel_not_from_the_repository():
    verifier = load_verifier()
    assert verifier.__name__ == VERIFIER_IMPORT_NAME
    assert "punctuation:no_comma" in verifier.INSTRUCTION_DICT
    assert Path(verifier.__file__).is_relative_to(assets_home())  # extracted at run time, not shipped here


@pytest.mark.parametrize("instruction_id, kwargs, response, strict, loose", [
    ("punctuation:no_comma", {}, "Tokyo then Kyoto then Osaka.", True, True),
    ("punctuation:no_comma", {}, "Tokyo, Kyoto, Osaka.", False, False),
    # Loose accepts the response without its first line (a chatty preamble).
    ("punctuation:no_comma", {}, "Sure, here it is:\nTokyo then Kyoto then Osaka.", False, True),
    # Sentence counting runs on the data-free Punkt replacement.
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "One sentence. Two sentences.", True, True),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "One. Two. Three. Four.", False, False),
    # Capital-word counting runs on the data-free word_tokenize replacement.
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "This is VERY IMPORTANT news.", True, True),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "This is Very Important news.", False, False),
    ("change_case:english_lowercase", {}, "all lower case english text here.", True, True),
    ("change_case:english_lowercase", {}, "Not all lower case.", False, False),
])
def test_ifeval_scores_handcrafted_responses_with_known_verdicts(instruction_id, kwargs, response, strict, loose):
    result = score_ifeval([_prompt(instruction_id, kwargs)], [response])
    assert result["strict"]["prompt_level"] == float(strict)
    assert result["loose"]["prompt_level"] == float(loose)


def test_ifeval_accuracy_is_reported_at_prompt_and_instruction_level():
    rows = ifeval_prompts(2)
    result = score_ifeval(rows, ["", ""])  # empty responses follow nothing
    assert result["strict"] == {"prompt_level": 0.0, "instruction_level": 0.0,
                                "per_instruction": result["strict"]["per_instruction"]}
    assert len(result["per_prompt"]) == 2
    assert sum(len(p["strict"]) for p in result["per_prompt"]) == sum(len(r["instruction_id_list"]) for r in rows)


# --- end to end: the CLI on two real models with the real judge -------------------------------------------------


def test_evaluate_pair_rejects_a_missing_model_folder_before_any_generation(oracle_path, tmp_path):
    from reflect_trainer.evaluation import evaluate_pair

    with pytest.raises(FileNotFoundError, match="--model-b"):
        evaluate_pair(oracle_path, str(tmp_path / "nowhere"), tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()


@pytest.fixture(scope="module")
def sft_model_path(oracle_path, tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct after 2 real SFT steps on 4 real AlpacaEval pairs (helpful_base subset).

    Two steps at lr 1e-4 already change the greedy answers (4 steps changed all 20 Vicuna answers); more steps
    only cost CI time.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from reflect_trainer.embedded import load_alpaca_eval

    pairs = load_alpaca_eval(limit=4, subset="helpful_base")
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["instruction"]}],
         "completion": [{"role": "assistant", "content": r["output"]}]}
        for r in pairs
    ])
    out = tmp_path_factory.mktemp("sft") / "model"
    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(oracle_path),
        args=SFTConfig(output_dir=str(out.parent / "run"), max_steps=2, per_device_train_batch_size=2,
                       learning_rate=1e-4, max_length=128, use_cpu=True, bf16=False, gradient_checkpointing=False,
                       report_to="none", save_strategy="no", logging_steps=1, seed=0),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def _letter(raw: str) -> str | None:
    """The judge's letter read off its raw continuation of "Verdict: [[" (first word only; "tie" is C)."""
    match = re.match(r"\W*(A|B|C|tie)\b", raw, re.IGNORECASE)
    return None if match is None else {"TIE": "C"}.get(match.group(1).upper(), match.group(1).upper())


def _model_a_outcome(raw_ab: str, raw_ba: str) -> str:
    """Model A's outcome from the two raw verdicts: shown first ("A" is model A), then second ("B" is model A)."""
    first, second = _letter(raw_ab), _letter(raw_ba)
    if first is None or second is None:
        return "invalid"
    points = {"A": 1, "C": 0, "B": -1}[first] + {"B": 1, "C": 0, "A": -1}[second]
    return "win" if points > 0 else "loss" if points < 0 else "tie"  # win+tie wins, win+loss ties


def assert_pairwise_summary_follows_from_the_stored_verdicts(pairwise: dict) -> None:
    questions, summary = pairwise["questions"], pairwise["summary"]
    outcomes = [_model_a_outcome(q["raw_verdict_ab"], q["raw_verdict_ba"]) for q in questions]
    assert [q["outcome"] for q in questions] == outcomes
    assert [(q["verdict_ab"], q["verdict_ba"]) for q in questions] == [
        (_letter(q["raw_verdict_ab"]), _letter(q["raw_verdict_ba"])) for q in questions]
    assert [q["chars_a"] for q in questions] == [len(q["answer_a"]) for q in questions]
    assert [q["chars_b"] for q in questions] == [len(q["answer_b"]) for q in questions]
    counts = {k: outcomes.count(k) for k in ("win", "tie", "loss", "invalid")}
    assert (summary["win"], summary["tie"], summary["loss"], summary["invalid_questions"]) == (
        counts["win"], counts["tie"], counts["loss"], counts["invalid"])
    letters = [_letter(q[f"raw_verdict_{order}"]) for q in questions for order in ("ab", "ba")]
    assert summary["invalid_verdicts"] == letters.count(None)
    assert summary["verdict_letters"] == {k: letters.count(k) for k in "ABC"}
    points = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    valid = [(points[o], len(q["answer_a"]) - len(q["answer_b"])) for o, q in zip(outcomes, questions)
             if o != "invalid"]
    expected_rate = sum(p for p, _ in valid) / len(valid) if valid else None
    assert summary["win_rate"] == pytest.approx(expected_rate)
    # Length-balanced: questions whose answers are within 20% of the longer one.
    balanced = [o for o, q in zip(outcomes, questions)
                if abs(len(q["answer_a"]) - len(q["answer_b"])) <= 0.2 * max(len(q["answer_a"]), len(q["answer_b"]))]
    assert [q["similar_length"] for q in questions] == [
        abs(len(q["answer_a"]) - len(q["answer_b"])) <= 0.2 * max(len(q["answer_a"]), len(q["answer_b"]))
        for q in questions]
    lb = summary["length_balanced"]
    assert (lb["questions"], lb["win"], lb["tie"], lb["loss"]) == (
        len(balanced), balanced.count("win"), balanced.count("tie"), balanced.count("loss"))
    balanced_valid = [points[o] for o in balanced if o != "invalid"]
    assert lb["win_rate"] == pytest.approx(sum(balanced_valid) / len(balanced_valid) if balanced_valid else None)
    # Length-adjusted: the reported (rate, slope) must be the penalised logistic fit's optimum on the stored data,
    # i.e. the fit's gradient vanishes there (x = length difference / its standard deviation, L2 of 1 on the slope).
    rate, slope = summary["length_adjusted_win_rate"], summary["length_slope"]
    if not valid:
        assert rate is None
        return
    if len({y for y, _ in valid}) == 1:  # one outcome only: the intercept has no finite optimum to check
        return
    diffs = [d for _, d in valid]
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
    xs = [d / std if std else 0.0 for d in diffs]
    b0 = math.log(rate / (1 - rate))
    ps = [1 / (1 + math.exp(-(b0 + slope * x))) for x in xs]
    assert sum(p - y for p, (y, _) in zip(ps, valid)) == pytest.approx(0.0, abs=1e-6)
    assert sum((p - y) * x for p, (y, _), x in zip(ps, valid, xs)) + slope == pytest.approx(0.0, abs=1e-6)


def assert_ifeval_scores_follow_from_the_stored_responses(ifeval: dict) -> None:
    verifier = load_verifier()
    for name in ("a", "b"):
        for mode, check in (("strict", verifier.test_instruction_following_strict),
                            ("loose", verifier.test_instruction_following_loose)):
            per_prompt = []
            for row in ifeval["prompts"]:
                example = verifier.InputExample(key=row["key"], instruction_id_list=row["instruction_id_list"],
                                                prompt=row["prompt"], kwargs=row["kwargs"])
                with seeded_random(row["key"]):  # the reference draws at random for some prompts (see there)
                    verdicts = check(example, {row["prompt"]: row[f"response_{name}"]}).follow_instruction_list
                assert row[f"{mode}_{name}"] == verdicts, (name, mode, row["key"])
                per_prompt.append(verdicts)
            flat = [v for verdicts in per_prompt for v in verdicts]
            reported = ifeval[name][mode]
            assert reported["prompt_level"] == pytest.approx(sum(all(v) for v in per_prompt) / len(per_prompt))
            assert reported["instruction_level"] == pytest.approx(sum(flat) / len(flat))
        assert ifeval[name]["prompts"] == len(ifeval["prompts"])


@pytest.mark.slow
def test_eval_cli_reports_scores_that_follow_from_its_stored_verdicts_on_20_vicuna_and_50_ifeval(
    oracle_path, sft_model_path, tmp_path, capsys
):
    from reflect_trainer.cli import main

    out = tmp_path / "eval.json"
    code = main(["eval", "--model-a", oracle_path, "--model-b", sft_model_path, "--n", "20", "--ifeval-n", "50",
                 "--max-new-tokens", "48", "--batch-size", "16", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())

    # Pairwise: 20 real Vicuna questions, each judged in both orders by the real local judge.
    questions = result["pairwise"]["questions"]
    assert len(questions) == 20
    assert result["judge"]["identity"].startswith("transformers:")
    # Two different real models: their answers differ somewhere.
    assert any(q["answer_a"] != q["answer_b"] for q in questions)
    assert all(q["answer_a"].strip() for q in questions)
    # Everything reported is recomputed here from what the judge wrote (the stored raw verdicts) and the stored
    # answers, with the paper's rule written out again, and must agree exactly.
    assert_pairwise_summary_follows_from_the_stored_verdicts(result["pairwise"])

    # IFEval: 50 prompts; each stored response is re-checked by the reference verifier, and the reported strict and
    # loose accuracies are recomputed from those per-instruction verdicts.
    assert len(result["ifeval"]["prompts"]) == 50
    assert_ifeval_scores_follow_from_the_stored_responses(result["ifeval"])

    printed = capsys.readouterr().out
    summary = result["pairwise"]["summary"]
    assert (f"pairwise, A vs B on 20 questions: win {summary['win']}  tie {summary['tie']}  "
            f"loss {summary['loss']}  invalid {summary['invalid_questions']}") in printed
    assert "IFEval on 50 prompts" in printed
    print(printed)  # shown with -s: the summary table
