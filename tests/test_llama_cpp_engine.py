"""The llama.cpp oracle engine on the real SmolLM2 GGUF: recycling real AlpacaEval pairs, zero-call reruns, batched
decoding, grammar-constrained structured output.

llama-cpp-python has no binary wheel on PyPI; ``make test`` builds it once into a cached wheel (about 7-10 minutes
on 2 cores, ``scripts/build_llama_cpp.sh``) before the suite runs, so these tests run in CI like the others. Without
it they fail with that hint rather than skip.
"""

import sys

import pytest

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.embedded import smollm2_gguf_path
from reflect_trainer.oracles import GenerationSettings, oracle_identity
from reflect_trainer.oracles.transformers_engine import weights_fingerprint
from reflect_trainer.parsing import DEGENERATE_REASONS, UNPARSED_REASONS, split_sections
from reflect_trainer.structured import SectionFormat, section_format_for
from reflect_trainer.templates import TEMPLATE_SETS


@pytest.fixture(scope="module")
def gguf() -> str:
    return str(smollm2_gguf_path())


@pytest.fixture(scope="module")
def llama_oracle(gguf):
    from reflect_trainer.oracles.llama_cpp_engine import LlamaCppOracle

    oracle = LlamaCppOracle(gguf, batch_size=8, device="cpu")
    yield oracle
    oracle.close()


def instructions(pairs, n):
    return [[{"role": "user", "content": row["instruction"]}] for row in pairs.select(range(n))]


# ---- without llama-cpp-python ----------------------------------------------------------------------------------------
def test_identity_is_the_gguf_fingerprint_computed_without_llama_cpp(gguf):
    assert oracle_identity("llama_cpp", gguf, batch_size=4, quantization="nf4") == \
        f"llama_cpp:{weights_fingerprint(smollm2_gguf_path())}"


def test_missing_llama_cpp_raises_an_import_error_that_says_how_to_install(gguf, monkeypatch):
    from reflect_trainer.oracles.llama_cpp_engine import LlamaCppOracle

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees when it is not installed
    with pytest.raises(ImportError, match=r"reflect-trainer\[llama-cpp\].*scripts/build_llama_cpp.sh"):
        LlamaCppOracle(gguf)


# ---- with it ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.llama_cpp
def test_recycles_real_pairs_then_rerun_makes_zero_oracle_calls(gguf, tmp_path):
    from reflect_trainer.embedded import load_alpaca_eval
    from reflect_trainer.parsing import PARSED_BUT_REJECTED

    data = load_alpaca_eval(limit=8, max_answer_words=30)  # short answers: a rewrite can finish in its budget
    config = ReflectionConfig(oracle_engine="llama_cpp", oracle_model_path=gguf, template_set="compact",
                              mode="response", max_new_tokens=192, oracle_batch_size=8, cache_dir=str(tmp_path))
    recycler = Recycler(config)
    out = recycler.recycle_dataset(data)
    stats = recycler.stats()
    assert stats["oracle_calls"] >= 1 and stats["oracle_prompts"] == 8 and stats["oracle_tokens"] > 0
    generated = {r["key"]: r for r in recycler.cache.records()}
    assert len(generated) == 8 and all(r["finish"] in ("stop", "length") for r in generated.values())
    known = set(UNPARSED_REASONS + DEGENERATE_REASONS + PARSED_BUT_REJECTED)
    for row in out:
        reason = row["response_reflection_fallback"]
        assert reason is None or reason in known
        assert (row["recycled_output"] != row["output"]) == (reason is None)
        if reason is None:  # an accepted answer is what the oracle generated, not something we put there
            assert any(row["recycled_output"] in r["raw"] for r in generated.values())
    assert stats.get("response_reflection/accepted", 0) >= 1

    again = Recycler(config)
    assert again.recycle_dataset(data).to_list() == out.to_list()
    assert again.stats()["oracle_calls"] == 0 and again.stats()["cache_hits"] == 8
    assert not again.oracle_loaded, "a fully cached run never loads the GGUF"


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_prompts_and_tokens_match_the_transformers_engine(llama_oracle, oracle_path, alpaca_pairs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(oracle_path)  # the HF copy of the same GGUF (same template)
    for row in alpaca_pairs.select(range(8)):
        plain = [{"role": "user", "content": row["instruction"]}]
        prefilled = [{"role": "system", "content": "Be picky."}, *plain,
                     {"role": "assistant", "content": "[Better Answer] " + row["output"][:40]}]
        for conversation in (plain, prefilled):
            head = conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation
            expected = tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
            if head is not conversation:
                expected += conversation[-1]["content"]
            assert llama_oracle.prompt_text(conversation) == expected
            assert llama_oracle.tokenize(expected) == tokenizer(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_batched_greedy_texts_equal_one_at_a_time(llama_oracle, alpaca_pairs):
    # Holds exactly because each sequence has its own KV stream and flash attention is off on CPU (with one shared
    # KV pool or flash attention, logits move by up to ~1 with the batch's make-up and greedy texts diverge).
    conversations = instructions(alpaca_pairs, 4)
    settings = GenerationSettings(max_new_tokens=32)
    one_at_a_time = [llama_oracle.generate([c], settings)[0] for c in conversations]
    assert llama_oracle.generate(conversations, settings) == one_at_a_time
    assert llama_oracle.generate(conversations[::-1], settings)[::-1] == one_at_a_time
    assert all(g.text.strip() for g in one_at_a_time)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_shared_prefix_decoded_once_and_copied_gives_the_same_greedy_texts_as_one_at_a_time(
        llama_oracle, alpaca_pairs):
    # Prompts of very different lengths behind one system turn; two slots for four prompts, so a slot that finished
    # is cleared and takes a fresh copy of the prefix for the next prompt.
    system = {"role": "system", "content": "You are a precise assistant who rewrites training data for AI assistants; "
                                           "keep every fact, fix every error, and answer in full sentences."}
    conversations = [[system, {"role": "user", "content": alpaca_pairs[i]["instruction"] + "\n\n" +
                               alpaca_pairs[i]["output"][:n]}] for i, n in zip(range(4), (0, 1000, 150, 400))]
    settings = GenerationSettings(max_new_tokens=16)
    llama_oracle.prefix_cache = False
    one_at_a_time = [llama_oracle.generate([c], settings)[0] for c in conversations]
    llama_oracle.prefix_cache, llama_oracle.batch_size = True, 2
    try:
        reused = llama_oracle.prefix_tokens_reused
        assert llama_oracle.generate(conversations, settings) == one_at_a_time
        assert llama_oracle.prefix_tokens_reused - reused >= 4 * 30  # the system turn, for each of the four
    finally:
        llama_oracle.batch_size = 8
    assert all(g.text.strip() for g in one_at_a_time)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_generation_stops_at_stop_strings_and_max_new_tokens(llama_oracle, alpaca_pairs):
    conversations = instructions(alpaca_pairs, 3)
    before = llama_oracle.tokens_generated
    outputs = llama_oracle.generate(conversations, GenerationSettings(max_new_tokens=12, stop=("\n",)))
    assert all(g.text and "\n" not in g.text for g in outputs)
    assert 0 < llama_oracle.tokens_generated - before <= 3 * 12


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_every_template_format_is_a_grammar_llama_cpp_accepts(llama_oracle):
    import llama_cpp

    formats = {SectionFormat(("Better Answer",)), SectionFormat(("New Instruction", "New Answer"))}
    for templates in TEMPLATE_SETS.values():
        for template in templates.values():
            for step in template.steps:
                opened = next((n for n in step.sections.values() if step.prefill.startswith(f"[{n}]")), None)
                formats.add(section_format_for(step.sections, opened))
    for fmt in formats:
        grammar = llama_cpp.llama_sampler_init_grammar(llama_oracle.vocab, fmt.gbnf().encode(), b"root")
        assert grammar, f"llama.cpp rejected the grammar of {fmt}:\n{fmt.gbnf()}"
        llama_cpp.llama_sampler_free(grammar)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_structured_output_gives_every_paper_template_output_its_sections(gguf, alpaca_pairs, tmp_path):
    # Without the grammar SmolLM2 writes none of the paper templates' sections (0 of 8 measured): it critiques
    # until it runs out of tokens. With it (and the engine's token budgets) every output has them.
    config = ReflectionConfig(oracle_engine="llama_cpp", oracle_model_path=gguf, template_set="paper", mode="both",
                              structured_output=True, max_new_tokens=96, oracle_batch_size=8, cache_dir=str(tmp_path))
    recycler = Recycler(config)
    from reflect_trainer.embedded import load_alpaca_eval

    out = recycler.recycle_dataset(load_alpaca_eval(limit=6, max_answer_words=30))  # short prompts: cheap prefill
    steps = {phase: template.steps[0] for phase, template in TEMPLATE_SETS["paper"].items()}
    for row in out:
        for phase, step in steps.items():
            raw = row[f"{phase}_raw"]
            sections = split_sections(raw, step.sections)
            assert set(sections) == set(step.sections.values()), f"{phase}: {raw!r}"
            assert raw.rstrip().endswith("[End]"), f"{phase}: the format is complete: {raw!r}"
    stats = recycler.stats()
    assert stats["instruction_reflection/total"] == stats["response_reflection/total"] == 6


# ---- decoding controls (tests/test_decoding_controls.py has the rest) ---------------------------------------------
@pytest.mark.slow
@pytest.mark.llama_cpp
def test_decoding_controls_end_a_real_loop_and_leave_the_prompt_copyable(llama_oracle, oracle_path):
    from test_decoding_controls import COPY, LOOP, repeated_ngram
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(oracle_path)  # the GGUF's vocabulary (test above)
    plain = llama_oracle.generate([LOOP], GenerationSettings(max_new_tokens=24))[0]
    loop, copy = llama_oracle.generate([LOOP, COPY], GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=3))
    penalized = llama_oracle.generate([LOOP], GenerationSettings(max_new_tokens=24, repetition_penalty=1.5))[0]
    assert plain.finish_reason == "length" and repeated_ngram(tokens(plain.text)["input_ids"], 3)  # it does loop
    assert loop.finish_reason == "stop" and repeated_ngram(tokens(loop.text)["input_ids"], 3) is None
    assert "quick brown fox jumps over the lazy dog" in copy.text  # the prompt's n-grams are not banned
    assert plain.text.count("hello") > 8 and penalized.text.count("hello") < 3, (plain, penalized)
