"""The data the tests recycle: real AlpacaEval pairs short enough for a CPU, and one injected pair with a rewrite."""

from __future__ import annotations

SHORT_ANSWER_WORDS = 30

# An injected pair and a complete, longer rewrite of its answer: what the gates accept (scripted-oracle tests).
ORIGINAL = {"instruction": "How do I keep basil fresh?", "input": "",
            "output": "Put the stems in a glass of water on the counter and cover the leaves loosely with a bag."}
LONGER = ("Trim the stems, stand them in a glass of fresh water like cut flowers and keep the glass on the counter, "
          "away from direct sun. Cover the leaves loosely with a plastic bag and change the water every two days. "
          "Do not refrigerate it: basil leaves turn black below about ten degrees.")


def short_pairs(limit: int | None = None):
    """Real AlpacaEval pairs (in file order) whose answers have at most 30 words: the real oracle can rewrite them
    within a small token budget on a CPU (with the long answers of the first pairs every rewrite ran into the budget
    and was rejected as truncated, so the accepted path never ran), and prefill does not dominate."""
    from reflect_trainer.embedded import load_alpaca_eval

    return load_alpaca_eval(limit=limit, max_answer_words=SHORT_ANSWER_WORDS)


def shortest_pairs(n: int) -> list[dict]:
    """The ``n`` real AlpacaEval pairs with the shortest instruction + answer (answers of at most 12 words), as
    ``instruction``/``input``/``output`` rows: the real oracle answers them in seconds."""
    from reflect_trainer.embedded import load_alpaca_eval

    rows = sorted(load_alpaca_eval(max_answer_words=12), key=lambda r: len(r["instruction"]) + len(r["output"]))
    return [{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in rows[:n]]
