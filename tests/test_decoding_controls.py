"""Decoding controls against repetition (``oracle_repetition_penalty``, ``oracle_no_repeat_ngram_size``): they reach
each engine, count the oracle's output and not the prompt, and are part of the cache key (old keys unchanged when
they are off). The llama.cpp engine's share is in ``test_llama_cpp_engine.py``, next to its loaded model."""

import pytest

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.oracles import Generation, GenerationSettings
from reflect_trainer.oracles.decoding import SMALL_ORACLE_CONTROLS, resolve_controls

# A conversation that makes the real oracle loop ("hello, hello, ..." to the budget), and one that asks it to copy a
# sentence of the prompt word for word.
LOOP = [{"role": "user", "content": "Write the word hello 50 times, separated by commas."},
        {"role": "assistant", "content": "hello, hello, hello, hello,"}]
COPY = [{"role": "user", "content": "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog."}]


def repeated_ngram(ids: list[int], n: int):
    seen = set()
    for i in range(len(ids) - n + 1):
        if tuple(ids[i:i + n]) in seen:
            return tuple(ids[i:i + n])
        seen.add(tuple(ids[i:i + n]))
    return None


@pytest.fixture(scope="module")
def plain_loop(real_oracle):
    """The real oracle without the controls on LOOP: it loops to the budget (what the controls must change)."""
    plain = real_oracle.generate([LOOP], GenerationSettings(max_new_tokens=16))[0]
    assert plain.finish_reason == "length" and repeated_ngram(real_oracle.tokenizer(plain.text)["input_ids"], 3)
    return plain


@pytest.mark.slow
def test_transformers_no_repeat_ngram_ends_a_real_loop_yet_lets_the_oracle_copy_the_prompt(real_oracle, plain_loop):
    loop, copy = real_oracle.generate([LOOP, COPY], GenerationSettings(max_new_tokens=16, no_repeat_ngram_size=3))
    assert repeated_ngram(real_oracle.tokenizer(loop.text)["input_ids"], 3) is None, loop
    assert "quick brown fox jumps over the lazy dog" in copy.text  # the prompt's n-grams are not banned


@pytest.mark.slow
def test_transformers_repetition_penalty_ends_a_real_loop(real_oracle, plain_loop):
    penalized = real_oracle.generate([LOOP], GenerationSettings(max_new_tokens=16, repetition_penalty=1.5))[0]
    assert plain_loop.text.count("hello") > 5 and penalized.text.count("hello") < 3, (plain_loop, penalized)


def test_controls_are_in_the_cache_key_and_leave_old_keys_alone(tmp_path):
    from test_support.oracles import ScriptedOracle

    rows = {"instruction": ["Say hi."], "input": [""], "output": ["hi"]}
    asked = []

    def run(**controls):
        oracle = ScriptedOracle(lambda c: Generation("Hello there, how can I help you today?", "stop"))
        Recycler(ReflectionConfig(cache_dir=str(tmp_path), mode="response", template_set="compact",
                                  progress_bar=False, **controls), oracle=oracle)(rows)
        asked.append(oracle.calls)

    off = {"oracle_repetition_penalty": 1.0, "oracle_no_repeat_ngram_size": 0}
    for controls in (off, {**off, "oracle_repetition_penalty": 1.2}, {**off, "oracle_no_repeat_ngram_size": 4},
                     {"oracle_repetition_penalty": 1.2, "oracle_no_repeat_ngram_size": 4}, {}, off):
        run(**controls)
    # Each setting is a key of its own; auto ({}) for response reflection with the compact templates is off: a hit.
    assert SMALL_ORACLE_CONTROLS["response_reflection"] == (1.0, 0) and asked == [1, 1, 1, 1, 0, 0]
    assert "repetition_penalty" not in GenerationSettings().to_dict()  # keys written before the controls still hit
    assert GenerationSettings(no_repeat_ngram_size=4).to_dict()["no_repeat_ngram_size"] == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"oracle_repetition_penalty": 0.0}, "oracle_repetition_penalty must be > 0"),
    ({"oracle_no_repeat_ngram_size": -1}, "oracle_no_repeat_ngram_size must be >= 0"),
    ({"oracle_engine": "vllm", "oracle_no_repeat_ngram_size": 3}, "the vllm engine has no no-repeat"),
    ({"oracle_base_url": "http://127.0.0.1:1/v1", "oracle_no_repeat_ngram_size": 3}, "the openai engine has no"),
])
def test_config_refuses_bad_values_and_no_repeat_where_no_engine_offers_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReflectionConfig(**kwargs)


def test_auto_controls_follow_the_template_set_the_phase_and_the_engine_and_set_values_win():
    instruction, response = "instruction_reflection", "response_reflection"
    assert resolve_controls(None, None, "transformers", True, instruction) == SMALL_ORACLE_CONTROLS[instruction]
    assert resolve_controls(None, None, "transformers", True, response) == SMALL_ORACLE_CONTROLS[response]
    assert resolve_controls(None, None, "transformers", False, instruction) == (1.0, 0)  # paper templates: off
    assert resolve_controls(None, None, "openai", True, instruction)[1] == 0  # no such option there
    assert resolve_controls(1.3, 3, "transformers", False, response) == (1.3, 3)
