"""Recycling real AlpacaEval pairs through the real 4-bit SmolLM2 oracle: outcomes, zero-call reruns, transforms."""

import logging

import pytest
from datasets import IterableDataset

from reflect_trainer import Recycler, ReflectionConfig, load_data, save_recycled, to_sft_dataset
from reflect_trainer.parsing import PARSED_BUT_REJECTED, UNPARSED_REASONS
from test_support.data import short_pairs
from test_support.oracles import CountingOracle

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 48  # enough to tell loops and echoes from answers; keeps CI's 2 cores busy ~1 minute


def make_recycler(cache_dir, oracle, **kwargs):
    config = ReflectionConfig(cache_dir=str(cache_dir), max_new_tokens=MAX_NEW_TOKENS, template_set="compact", **kwargs)
    return Recycler(config, oracle=oracle)


@pytest.fixture(scope="module")
def recycled16(tmp_path_factory, real_oracle):
    """16 real pairs recycled once in `both` mode; several tests read the result."""
    cache_dir = tmp_path_factory.mktemp("cache16")
    data = short_pairs().select(range(16))
    oracle = CountingOracle(real_oracle)
    recycler = make_recycler(cache_dir, oracle)
    logger = logging.getLogger("reflect_trainer.recycler")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out = recycler.recycle_dataset(data)
    finally:
        logger.removeHandler(handler)
    return {"data": data, "out": out, "recycler": recycler, "oracle": oracle, "cache_dir": cache_dir, "log": records}


def test_both_mode_gives_every_row_new_fields_or_a_fallback_reason(recycled16):
    out = recycled16["out"]
    assert len(out) == 16
    known = set(UNPARSED_REASONS + PARSED_BUT_REJECTED)
    for row in out:
        for phase in ("instruction_reflection", "response_reflection"):
            reason = row[f"{phase}_fallback"]
            assert row[f"{phase}_raw"], "the oracle's raw text is kept for every phase"
            assert reason is None or reason in known
        ir_reason = row["instruction_reflection_fallback"]
        if ir_reason is None:  # accepted: a new instruction that extends the original, with a new answer
            assert row["reflected_instruction"] != row["instruction"]
            assert row["reflected_instruction"].startswith(row["instruction"].strip()[:40])
        else:  # fell back: the original pair goes on to response reflection
            assert (row["reflected_instruction"], row["reflected_output"]) == (row["instruction"], row["output"])
        if row["response_reflection_fallback"] is None:
            assert row["recycled_output"] != row["reflected_output"]
        else:
            assert row["recycled_output"] == row["reflected_output"]
    stats = recycled16["recycler"].stats()
    assert stats["instruction_reflection/total"] == stats["response_reflection/total"] == 16
    assert any("parsed" in line and "accepted" in line for line in recycled16["log"]), "parse rate is logged"
    # The logged rates are those of the stored outcomes (recomputed from each row's fallback reason).
    for phase in ("instruction_reflection", "response_reflection"):
        reasons = [row[f"{phase}_fallback"] for row in out]
        parsed = sum(r is None or r in PARSED_BUT_REJECTED for r in reasons)
        assert stats[f"{phase}/parse_rate"] == parsed / 16
        assert stats.get(f"{phase}/accepted", 0) == reasons.count(None)


def user_text(conversation) -> str:
    return next(m["content"] for m in conversation if m["role"] == "user")


def test_oracle_saw_whole_batches_and_each_step_was_sent_what_the_previous_one_produced(recycled16):
    """16 rows, three template steps: demand_more (all 16), answer_new_instruction (the rows whose new instruction
    was accepted by the parser), better_answer (all 16, on the pair instruction reflection left). A step's prompts go
    out in one call per length budget (here one), never one call per row."""
    oracle, out = recycled16["oracle"], recycled16["out"]
    stats = recycled16["recycler"].stats()
    assert stats["oracle_calls"] == oracle.calls == len(oracle.sizes)
    assert sum(oracle.sizes) == len(oracle.prompts) == stats["oracle_prompts"]
    demand = [c for c in oracle.prompts if user_text(c).startswith("Make this request more demanding")]
    better = [c for c in oracle.prompts if "Here is a draft reply" in user_text(c)]
    answer = [c for c in oracle.prompts if c not in demand and c not in better]
    # max_new_tokens 48 is below every length budget (multiples of 64): one budget, so one call per step.
    assert oracle.sizes == [16, len(answer), 16]
    assert oracle.prompts[:16] == demand and oracle.prompts[-16:] == better
    # The answering step was sent exactly the new instructions the oracle wrote, one prompt each.
    accepted = [row["reflected_instruction"] for row in out if row["instruction_reflection_fallback"] is None]
    assert accepted, "no instruction reflection accepted: the instruction path did not run"
    sent = sorted(user_text(c) for c in answer)
    assert set(accepted) <= set(sent) and len(sent) <= 16
    # Response reflection was sent the pair instruction reflection produced (new or original), not the input row.
    for row in out:
        assert any(row["reflected_instruction"] in user_text(c) and row["reflected_output"] in user_text(c)
                   for c in better), row["instruction"]
    assert stats["oracle_tokens"] > 0 and stats["oracle_tokens_per_s"] > 0


def test_second_run_over_same_rows_makes_zero_oracle_calls(recycled16, real_oracle):
    oracle = CountingOracle(real_oracle)
    again = make_recycler(recycled16["cache_dir"], oracle).recycle_dataset(recycled16["data"])
    assert oracle.calls == 0 and oracle.prompts == []
    assert again.to_list() == recycled16["out"].to_list()


def test_fully_cached_run_never_loads_the_oracle(recycled16, oracle_path):
    # The fixture's oracle is NF4: the same quantization gives the same oracle identity (the default, "auto", is fp32
    # on CPU: another oracle, whose results are keyed apart).
    config = ReflectionConfig(cache_dir=str(recycled16["cache_dir"]), max_new_tokens=MAX_NEW_TOKENS,
                              oracle_model_path=oracle_path, oracle_quantization="nf4", template_set="compact")
    recycler = Recycler(config)  # builds its own oracle lazily, only on a miss
    out = recycler.recycle_dataset(recycled16["data"])
    assert not recycler.oracle_loaded
    assert out["recycled_output"] == recycled16["out"]["recycled_output"]


def test_with_transform_and_iterable_map_serve_the_cache(recycled16, real_oracle):
    oracle = CountingOracle(real_oracle)
    recycler = make_recycler(recycled16["cache_dir"], oracle)
    lazy = recycled16["data"].with_transform(recycler)
    assert lazy[3]["recycled_output"] == recycled16["out"][3]["recycled_output"]
    assert lazy[0:4]["recycled_instruction"] == recycled16["out"]["recycled_instruction"][:4]
    stream = IterableDataset.from_generator(lambda: iter(recycled16["data"])).map(recycler, batched=True, batch_size=8)
    assert [r["recycled_output"] for r in stream] == recycled16["out"]["recycled_output"]
    assert oracle.calls == 0


def test_export_roundtrips_through_jsonl_and_parquet(recycled16, tmp_path):
    exported = to_sft_dataset(recycled16["out"])
    for suffix in (".jsonl", ".parquet"):
        back = load_data(save_recycled(exported, tmp_path / f"out{suffix}"))
        assert back["recycled_output"] == recycled16["out"]["recycled_output"]
        assert back[0]["completion"] == [{"role": "assistant", "content": recycled16["out"][0]["recycled_output"]}]
        assert {"instruction_reflection_raw", "response_reflection_fallback", "instruction", "output"} <= set(
            back.column_names
        )


def test_only_uncached_keys_go_to_the_oracle(recycled16, real_oracle):
    """Response mode over rows 12..19. Rows 12..15 were response-reflected in `both` mode; where their instruction
    reflection fell back, the response step saw the original pair, so its key is the same and it is a cache hit.
    Rows 16..19 are new."""
    shared = sum(r["instruction_reflection_fallback"] is not None for r in recycled16["out"].select(range(12, 16)))
    oracle = CountingOracle(real_oracle)
    recycler = make_recycler(recycled16["cache_dir"], oracle, mode="response")
    data = short_pairs().select(range(12, 20))
    recycler.recycle_dataset(data)
    assert len(oracle.prompts) == 8 - shared
    assert recycler.stats()["cache_hits"] == shared
    recycler.recycle_dataset(data)
    assert len(oracle.prompts) == 8 - shared  # nothing new the second time


def test_converted_default_oracle_uses_chatml_end_of_turn(oracle_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    assert tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
