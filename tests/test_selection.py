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
