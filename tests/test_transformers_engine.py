"""The transformers engine's length batching and shared-prefix KV cache: the same greedy text as one prompt at a time,
with fewer prompt tokens computed. Real oracle (SmolLM2-135M-Instruct, unquantized: what a CPU run gets by default)."""

import pytest

from reflect_trainer.oracles import GenerationSettings
from reflect_trainer.oracles.transformers_engine import TransformersOracle, length_batches, shared_prefix_length


def test_shared_prefix_ends_where_token_ids_differ_and_leaves_every_row_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert shared_prefix_length([[5, 1], [6, 1]]) == 0


def test_length_batches_are_sorted_and_stay_under_the_token_budget():
    lengths = [900, 40, 410, 60, 420, 50]
    batches = length_batches(lengths, 100, batch_tokens=1200, batch_size=16)
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)
    assert all(len(b) * (max(lengths[i] for i in b) + 100) <= 1200 for b in batches if len(b) > 1)
    assert batches == [[1, 5, 3], [2, 4], [0]]
    assert length_batches([5, 1, 3], 10, batch_tokens=0, batch_size=2) == [[1, 2], [0]]  # off: padded batches


@pytest.fixture(scope="module")
def fp32_oracle(oracle_path):
    oracle = TransformersOracle(oracle_path, quantization="none", device="cpu", batch_size=16)
    yield oracle
    oracle.close()


@pytest.mark.slow
def test_length_batched_prefix_cached_greedy_texts_equal_one_at_a_time(fp32_oracle, alpaca_pairs):
    # Prompts of very different lengths (about 60 to 280 tokens) behind one system turn all of them share.
    system = {"role": "system", "content": "You are a precise assistant who rewrites training data for AI assistants; "
                                           "keep every fact, fix every error, and answer in full sentences."}
    rows = [alpaca_pairs[i] for i in (0, 1, 2, 3)]
    conversations = [[system, {"role": "user", "content": r["instruction"] + "\n\n" + r["output"][:n]}]
                     for r, n in zip(rows, (0, 1000, 150, 400))]
    settings = GenerationSettings(max_new_tokens=12)
    oracle = fp32_oracle
    oracle.batch_tokens, oracle.prefix_cache = 0, False  # the reference: one prompt per call, no cache, no packing
    one_at_a_time = [oracle.generate([c], settings)[0] for c in conversations]

    oracle.batch_tokens, oracle.prefix_cache = 600, True  # a budget that splits these four into sub-batches
    tokenizer = oracle.tokenizer
    lengths = [len(tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]) for c in conversations]
    assert max(lengths) > 4 * min(lengths) and len(length_batches(lengths, 12, 600, 16)) >= 2
    oracle.prefill_tokens = oracle.prefix_tokens_reused = 0
    batched = oracle.generate(conversations, settings)
    assert batched == one_at_a_time
    assert all(g.text.strip() for g in batched)
    # The system turn was computed once and reused by all four; no pad token was computed.
    assert oracle.prefix_tokens_reused >= 4 * 30
    assert oracle.prefill_tokens == sum(lengths) - oracle.prefix_tokens_reused + oracle.prefix_tokens_reused // 4 - 4
