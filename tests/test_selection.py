"""IFD / reverse-IFD against perplexities computed by hand, and every branch of the selection rule."""

import math

import pytest
import torch

from reflect_trainer.selection import GUESS_INSTRUCTION_PROMPT, PairScores, score_pairs, select_version


def hand_ppl(model, context_ids, target_ids):
    """Perplexity of target given context, one sequence, straight from the model's own loss."""
    ids = torch.tensor([context_ids + target_ids])
    labels = torch.tensor([[-100] * len(context_ids) + target_ids])
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=labels).loss.item())


@pytest.mark.slow
def test_ifd_matches_perplexities_computed_by_hand(oracle_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    model = AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32).eval()
    pairs = [("What is the capital of France?", "The capital of France is Paris."),
             ("Name a primary colour.", "Blue is a primary colour, and so are red and yellow.")]
    scores = score_pairs(model, tokenizer, pairs, batch_size=3)  # odd batch: padding across pairs
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for (q, a), s in zip(pairs, scores):
        prompt = enc(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True))
        a_ids, q_ids = enc(a), enc(q)
        direct = (lambda ids: hand_ppl(model, [tokenizer.bos_token_id], ids)) if tokenizer.bos_token_id is not None \
            else (lambda ids: hand_ppl(model, ids[:1], ids[1:]))
        ifd = hand_ppl(model, prompt, a_ids) / direct(a_ids)
        rifd = hand_ppl(model, enc(GUESS_INSTRUCTION_PROMPT.format(response=a)), q_ids) / direct(q_ids)
        assert s.ifd == pytest.approx(ifd, rel=1e-3) and s.reverse_ifd == pytest.approx(rifd, rel=1e-3)
        assert s.ifd < 1  # the question helps predict its answer


def S(ifd, rifd):
    return PairScores(ifd, rifd)


BASE = {"original": S(0.5, 0.8), "a": S(0.6, 0.7)}


def test_harder_instruction_keeps_qa_when_it_fits_better():
    assert select_version({**BASE, "q": S(0.7, 0.9), "qa": S(0.8, 0.6)}) == "qa"


@pytest.mark.parametrize(
    "q,qa",
    [(S(0.7, 0.9), S(0.8, 0.95)), (S(0.7, 0.9), S(1.2, 0.6)), (S(0.7, 1.5), S(0.8, 1.0))],
    ids=["rifd-not-lower", "ifd>=1", "rifd>=1"],
)
def test_harder_instruction_with_unfit_qa_keeps_original(q, qa):
    assert select_version({**BASE, "q": q, "qa": qa}) == "original"
    assert select_version({**BASE, "q": q, "qa": qa}, drop_instead=True) is None


def test_easier_instruction_keeps_a_when_it_fits_better():
    assert select_version({**BASE, "q": S(0.4, 0.9), "qa": S(0.1, 0.1)}) == "a"


@pytest.mark.parametrize("a", [S(0.6, 0.9), S(1.1, 0.5), S(0.6, 1.2)], ids=["rifd-not-lower", "ifd>=1", "rifd>=1"])
def test_easier_instruction_with_unfit_a_keeps_original_or_drops(a):
    scores = {"original": S(0.5, 0.8 if a.reverse_ifd < 1 else 1.5), "a": a, "q": S(0.4, 0.9), "qa": S(0.1, 0.1)}
    assert select_version(scores) == "original"
    assert select_version(scores, drop_instead=True) is None


def test_threshold_is_configurable():
    scores = {**BASE, "q": S(0.4, 0.9), "a": S(1.1, 0.7), "qa": S(0.1, 0.1)}
    assert select_version(scores) == "original"
    assert select_version(scores, threshold=1.2) == "a"


@pytest.mark.slow
def test_cli_selective_recycle_scores_with_the_student_given_by_path(oracle_path, tmp_path):
    """`recycle --mode selective --student PATH` with the real oracle. The student is a small random model (not the
    oracle's weights), so scores that match perplexities computed by hand with it prove it was the scorer."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from reflect_trainer.cli import main
    from test_support.data import shortest_pairs

    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    rows = shortest_pairs(2)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["recycle", str(data), "--out", str(out), "--engine", "transformers", "--quantization", "none",
                 "--mode", "selective", "--student", str(tmp_path / "student"), "--templates", "compact",
                 "--max-new-tokens", "16", "--keep-dropped"]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in exported] == [r["instruction"] for r in rows]
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for row in exported:
        q, a = row["instruction"], row["output"]
        prompt = enc(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True))
        bos = [tokenizer.bos_token_id]
        ifd = hand_ppl(student, prompt, enc(a)) / hand_ppl(student, bos, enc(a))
        guess = enc(GUESS_INSTRUCTION_PROMPT.format(response=a))
        rifd = hand_ppl(student, guess, enc(q)) / hand_ppl(student, bos, enc(q))
        assert row["ifd_original"] == pytest.approx(ifd, rel=1e-3)
        assert row["rifd_original"] == pytest.approx(rifd, rel=1e-3)
        # The `a` version is the real oracle's rewrite of this answer, scored by the same student.
        assert row["a_raw"].strip()
        a_ifd = hand_ppl(student, prompt, enc(row["a_output"])) / hand_ppl(student, bos, enc(row["a_output"]))
        assert row["ifd_a"] == pytest.approx(a_ifd, rel=1e-3)
        scores = {v: PairScores(row[f"ifd_{v}"], row[f"rifd_{v}"]) for v in ("original", "q", "a", "qa")}
        assert row["selected_version"] == select_version(scores)
