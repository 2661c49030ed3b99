"""Compare two models, e.g. the same base trained on original vs recycled data (``reflect-trainer eval``).

1. Both models answer a held-out question set (default: the Vicuna-80 questions of the embedded AlpacaEval file)
   and the IFEval prompts, greedily, one model loaded at a time.
2. A judge (any oracle engine; default: the embedded SmolLM2-135M-Instruct) compares each pair of answers in both
   orders (:mod:`.pairwise`): win/tie/loss for model A, with length-controlled views.
3. IFEval's verifier scores instruction following without a judge (:mod:`.ifeval`).

Everything (answers, both raw verdicts, lengths, summary) goes to one JSON file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..oracles import ENGINES, GenerationSettings, load_oracle
from ..text import request_text
from .ifeval import ifeval_prompts, load_verifier, score_ifeval
from .pairwise import judge_pairs, similar_length, summarize

logger = logging.getLogger(__name__)

# Subsets of the embedded AlpacaEval file (``dataset`` column); "vicuna" is the paper's Vicuna-80 evaluation set.
ALPACA_EVAL_SUBSETS = ("vicuna", "koala", "oasst", "selfinstruct", "helpful_base")

__all__ = ["evaluate_pair", "format_summary", "generate_answers", "load_questions"]


def load_questions(source: str = "vicuna", limit: int | None = None) -> list[str]:
    """Questions from an AlpacaEval subset name or from a JSON/JSONL/Parquet file / ``datasets`` folder with an
    ``instruction`` (plus optional ``input``), ``question`` or ``prompt`` column."""
    from ..embedded import load_alpaca_eval
    from ..export import load_data

    if source in ALPACA_EVAL_SUBSETS:
        return list(load_alpaca_eval(limit=limit, subset=source)["instruction"])
    data = load_data(source, limit)
    for column in ("instruction", "question", "prompt"):
        if column in data.column_names:
            break
    else:
        raise ValueError(f"{source}: no 'instruction', 'question' or 'prompt' column (found {data.column_names})")
    questions = []
    for i, row in enumerate(data):
        text = row[column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{source}: row {i}, field {column!r} is empty or not a string; fix or drop that row")
        if column == "instruction" and row.get("input"):
            text = request_text(text, row["input"])  # the paper's pre-processing: the input joins the instruction
        questions.append(text)
    return questions


def generate_answers(model_path: str, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                     quantization: str = "none", device: str | None = None) -> list[str]:
    """Greedy answers of a local model to single-turn prompts, in batches; the model is freed afterwards.

    It goes through the transformers oracle engine (batched, left-padded generation). A model whose tokenizer has
    no chat template gets the Vicuna template, as in training.
    """
    from ..chat import ensure_chat_template

    model = load_oracle("transformers", model_path, quantization=quantization, device=device, batch_size=batch_size)
    try:
        ensure_chat_template(model.tokenizer)
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
        return [g.text for g in model.generate([[{"role": "user", "content": p}] for p in prompts], settings)]
    finally:
        model.close()


def evaluate_pair(model_a: str, model_b: str, out: str | Path, *, judge: str | None = None,
                  judge_engine: str = "transformers", judge_kwargs: dict | None = None, questions: str = "vicuna",
                  n: int = 20, ifeval_n: int = 50, max_new_tokens: int = 256, batch_size: int = 16,
                  quantization: str = "none", device: str | None = None) -> dict:
    """Answer, judge in both orders, score IFEval, write everything to ``out`` (JSON) and return it.

    Per question the JSON keeps both answers and their lengths in characters, the judge's raw text and parsed letter
    in each order (``*_ab``: model A's answer shown first, so "A" means model A; ``*_ba``: model B's answer shown
    first, so "A" means model B), and the combined outcome for model A (win, tie, loss, invalid).

    Args:
        model_a, model_b: Local model folders; outcomes are reported from model A's point of view.
        out: Where the JSON result is written.
        judge: Judge model folder (default: the embedded SmolLM2-135M-Instruct); for the ``openai`` engine, an
            optional tokenizer folder.
        judge_engine: Any registered oracle engine (``transformers``, ``openai``).
        judge_kwargs: Extra engine arguments (``base_url``, ``served_model``, ...). ``quantization``, ``device``
            and ``batch_size`` are passed to the judge too unless given here.
        questions: An AlpacaEval subset name (default ``vicuna``) or a question file.
        n: Questions judged (the first ``n``); 0 skips the pairwise comparison.
        ifeval_n: IFEval prompts scored (the first ``ifeval_n``); 0 skips IFEval.
        max_new_tokens: Most tokens per answer.
        batch_size: Prompts per ``generate`` call.
        quantization: ``none`` (fastest on CPU), ``nf4`` or ``int8`` for the answering models.
        device: ``cpu``, ``cuda``...; default: CUDA when available.
    """
    # Everything that can fail cheaply fails before the first model spends minutes answering.
    if n > 0 and judge_engine not in ENGINES:
        raise ValueError(f"unknown judge engine {judge_engine!r}; known: {sorted(ENGINES)}")
    for name, path in (("--model-a", model_a), ("--model-b", model_b)):
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{name} {path}: not a local model folder (no config.json)")
    question_list = load_questions(questions, n) if n > 0 else []
    ifeval_rows = ifeval_prompts(ifeval_n) if ifeval_n > 0 else []
    if ifeval_rows:
        load_verifier()  # missing langdetect/nltk/immutabledict show up now, not after generation
    prompts = question_list + [row["prompt"] for row in ifeval_rows]
    answers = {}
    for name, path in (("a", model_a), ("b", model_b)):
        logger.info("model %s (%s): answering %d questions and %d IFEval prompts", name.upper(), path,
                    len(question_list), len(ifeval_rows))
        answers[name] = generate_answers(str(path), prompts, max_new_tokens, batch_size, quantization, device)

    result: dict = {
        "models": {"a": str(model_a), "b": str(model_b)},
        "settings": {"questions": questions, "n": len(question_list), "ifeval_n": len(ifeval_rows),
                     "max_new_tokens": max_new_tokens, "quantization": quantization},
    }
    if question_list:
        from ..embedded import default_oracle_path

        judge_path = judge if judge is not None else (str(default_oracle_path()) if judge_engine == "transformers"
                                                      else None)
        kwargs = {"quantization": quantization, "device": device, "batch_size": batch_size, **(judge_kwargs or {})}
        judge_oracle = load_oracle(judge_engine, judge_path, **kwargs)
        try:
            answers_a, answers_b = answers["a"][: len(question_list)], answers["b"][: len(question_list)]
            logger.info("judging %d questions in both orders", len(question_list))
            judgements = judge_pairs(judge_oracle, question_list, answers_a, answers_b)
            result["judge"] = {"engine": judge_engine, "path": judge_path, "identity": judge_oracle.identity}
        finally:
            judge_oracle.close()
        result["pairwise"] = {
            "summary": summarize(judgements, answers_a, answers_b),
            "questions": [
                {"question": q, "answer_a": a, "answer_b": b, "chars_a": len(a), "chars_b": len(b),
                 "similar_length": similar_length(len(a), len(b)), "raw_verdict_ab": j.raw_ab,
                 "raw_verdict_ba": j.raw_ba, "verdict_ab": j.verdict_ab, "verdict_ba": j.verdict_ba,
                 "outcome": j.outcome}
                for q, a, b, j in zip(question_list, answers_a, answers_b, judgements)
            ],
        }
    if ifeval_rows:
        scores = {name: score_ifeval(ifeval_rows, answers[name][len(question_list):]) for name in ("a", "b")}
        result["ifeval"] = {
            name: {k: v for k, v in scores[name].items() if k != "per_prompt"} for name in ("a", "b")
        }
        result["ifeval"]["prompts"] = [
            {**row, "response_a": ra, "response_b": rb, "strict_a": pa["strict"], "loose_a": pa["loose"],
             "strict_b": pb["strict"], "loose_b": pb["loose"]}
            for row, ra, rb, pa, pb in zip(ifeval_rows, answers["a"][len(question_list):],
                                           answers["b"][len(question_list):], scores["a"]["per_prompt"],
                                           scores["b"]["per_prompt"])
        ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{100 * value:5.1f}"


def format_summary(result: dict) -> str:
    """A short table of the pairwise outcome (model A vs model B) and IFEval accuracies."""
    lines = [f"A = {result['models']['a']}", f"B = {result['models']['b']}"]

    def row(label: str, value: str, detail: str) -> str:
        return f"  {label:<48}{value:>6} %  {detail}".rstrip()

    if "pairwise" in result:
        s = result["pairwise"]["summary"]
        lb = s["length_balanced"]
        lines += [
            f"judge: {result['judge']['identity']}, each question in both orders",
            f"pairwise, A vs B on {s['questions']} questions: win {s['win']}  tie {s['tie']}  loss {s['loss']}  "
            f"invalid {s['invalid_questions']} ({s['invalid_verdicts']} of {2 * s['questions']} verdicts unparseable)",
            row("win rate (win + tie/2)", _pct(s["win_rate"]), ""),
            row(f"length-balanced ({lb['questions']} questions within ±{lb['tolerance']:.0%})", _pct(lb["win_rate"]),
                f"win {lb['win']}  tie {lb['tie']}  loss {lb['loss']}"),
            row("length-adjusted (logistic fit at equal length)", _pct(s["length_adjusted_win_rate"]), ""),
            f"  mean answer length: A {s['mean_chars_a']:.0f} chars, B {s['mean_chars_b']:.0f} chars; verdict letters "
            f"{s['verdict_letters']}; position-consistent {s['position_consistent']}/{s['questions']}",
        ]
    if "ifeval" in result:
        title = f"IFEval on {result['ifeval']['a']['prompts']} prompts, accuracy %"
        lines.append(f"{title:<44}strict: prompt  instruction   loose: prompt  instruction")
        for name in ("a", "b"):
            r = result["ifeval"][name]
            strict, loose = r["strict"], r["loose"]
            lines.append(f"  {name.upper():<50}{_pct(strict['prompt_level'])}{_pct(strict['instruction_level']):>13}"
                         f"{_pct(loose['prompt_level']):>17}{_pct(loose['instruction_level']):>13}")
    return "\n".join(lines)
