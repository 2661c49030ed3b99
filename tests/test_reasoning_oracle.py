"""Reasoning oracles (Qwen3, DeepSeek-R1 distills) think before they answer: the thinking stays out of the parsed
fields, the gates and the trained text, is kept raw in the cache, is budgeted on its own, and can be turned off
through the chat template; a budget spent on thinking is a counted fallback.

The recycling tests inject a thinking oracle's outputs (a scripted oracle, as in test_acceptance_gates); the engine
tests check what the real engines hand the chat template or the server: the embedded SmolLM2 tokenizer, and a
request-capturing loopback server.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reflect_trainer.cache import cache_key
from reflect_trainer.oracles import Generation, GenerationSettings
from test_support.data import LONGER, ORIGINAL
from test_support.oracles import ScriptedOracle
from test_support.recycling import recycle as recycle_with

# What a reasoning oracle writes first: drafts with markers in them, half sentences, junk.
THOUGHT = ("Okay, the user wants a better answer. Draft: [Better Answer] Keep it in water. [End] Hmm, too short. "
           "**New Instruction**: maybe ask about storage? No. Let me also mention the fridge")


class ThinkingOracle:
    """A scripted reasoning oracle: thinks (``<think>…</think>``) before it answers, unless the chat template's
    variables it is handed say ``enable_thinking: false`` — what Qwen3's template does with that variable."""

    identity = "scripted-thinker"

    def __init__(self, answer: str, thought: str = THOUGHT, finish: str = "stop", opened_by_template: bool = False):
        self.answer, self.thought, self.finish = answer, thought, finish
        self.opened_by_template = opened_by_template  # DeepSeek-R1: the prompt ends with <think>, output has </think>
        self.tokens_generated = 0
        self.settings: list[GenerationSettings] = []

    def generate(self, conversations, settings: GenerationSettings):
        self.settings.append(settings)
        if (settings.chat_template_kwargs or {}).get("enable_thinking", True) is False:
            return [Generation(self.answer, self.finish) for _ in conversations]
        opener = "" if self.opened_by_template else "<think>\n"
        if self.finish == "length":  # the budget ran out while thinking: the block never closes
            return [Generation(f"{opener}{self.thought}", "length") for _ in conversations]
        return [Generation(f"{opener}{self.thought}\n</think>\n\n{self.answer}", self.finish) for _ in conversations]

    def close(self) -> None:
        pass


def recycle(tmp_path, oracle, **config):
    config = {"mode": "response", "template_set": "paper", **config}
    return recycle_with([ORIGINAL], oracle, tmp_path / "cache", **config)


# ---- thinking kept out of the fields and the gates, kept in the cache -----------------------------------------
@pytest.mark.parametrize("opened_by_template", [False, True], ids=["think_block", "opened_by_the_template"])
def test_thinking_with_markers_stays_out_of_the_recycled_pair_and_stays_in_the_cache(tmp_path, opened_by_template):
    oracle = ThinkingOracle(f"[Better Answer] {LONGER} [End]", opened_by_template=opened_by_template)
    out, recycler = recycle(tmp_path, oracle)
    assert out["response_reflection_fallback"] == [None]
    assert out["recycled_output"] == [LONGER]  # not the draft inside the thinking
    for column in ("recycled_instruction", "recycled_input", "recycled_output"):
        assert "think>" not in out[column][0] and "Hmm" not in out[column][0]
    (record,) = recycler.cache.records()
    assert THOUGHT in record["raw"] and record["raw"].rstrip().endswith("[End]")  # raw: parsed on read
    assert THOUGHT in out["response_reflection_raw"][0]


def test_thinking_before_a_prefilled_section_is_cut_off_too(tmp_path):
    # The compact template pre-fills "[Better Answer] ": whatever the oracle writes continues that section.
    out, _ = recycle(tmp_path, ThinkingOracle(LONGER), template_set="compact")
    assert out["response_reflection_fallback"] == [None]
    assert out["recycled_output"] == [LONGER]


def test_other_thinking_tags_are_configurable_and_none_turns_the_stripping_off(tmp_path):
    thought = "<reasoning>[Better Answer] Just water. [End]</reasoning>"
    oracle = ScriptedOracle(lambda conversation: Generation(f"{thought}\n[Better Answer] {LONGER} [End]", "stop"))
    out, _ = recycle(tmp_path / "a", oracle, oracle_thinking_tags=["<reasoning>", "</reasoning>"])
    assert out["recycled_output"] == [LONGER]
    out, _ = recycle(tmp_path / "b", oracle, oracle_thinking_tags=None)
    assert out["recycled_output"] == [ORIGINAL["output"]]  # the draft in the thinking was parsed, and rejected
    with pytest.raises(ValueError, match="oracle_thinking_tags"):
        recycle(tmp_path / "c", oracle, oracle_thinking_tags=["<think>"])


@pytest.mark.parametrize("generated, answer, closed", [
    ("<think>a [End] b</think>\n[Better Answer] x", "[Better Answer] x", True),
    ("  <think>\nnever closed [Better Answer] y", "", False),
    ("opened by the prompt</think>\n\nx", "x", True),
    ("x <think>not leading</think> y", "x <think>not leading</think> y", True),  # a mention, not a block
    ("[Better Answer] no thinking", "[Better Answer] no thinking", True),
])
def test_only_a_leading_thinking_block_is_cut_off(generated, answer, closed):
    from reflect_trainer.thinking import split_thinking

    thought = split_thinking(generated)
    assert (thought.answer, thought.closed) == (answer, closed)


# ---- thinking turned off through the chat template ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"enable_thinking": False}, '{"enable_thinking": false}'], ids=["dict", "json"])
def test_template_switch_turns_the_thinking_off(tmp_path, kwargs):
    oracle = ThinkingOracle(f"[Better Answer] {LONGER} [End]")
    out, recycler = recycle(tmp_path, oracle, oracle_chat_template_kwargs=kwargs)
    assert [s.chat_template_kwargs for s in oracle.settings] == [{"enable_thinking": False}]
    assert "<think>" not in out["response_reflection_raw"][0]
    (record,) = recycler.cache.records()
    assert "think>" not in record["raw"]
    assert out["recycled_output"] == [LONGER]


def test_template_kwargs_are_in_the_cache_key_only_when_set():
    plain = GenerationSettings(max_new_tokens=64)
    assert "chat_template_kwargs" not in plain.to_dict()  # keys written before this setting stay valid
    assert plain.to_dict() == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": []}
    off = GenerationSettings(max_new_tokens=64, chat_template_kwargs={"enable_thinking": False})
    assert cache_key({"generation": off.to_dict()}) != cache_key({"generation": plain.to_dict()})


def test_default_config_leaves_the_generation_settings_as_before(tmp_path):
    oracle = ThinkingOracle(f"[Better Answer] {LONGER} [End]")
    recycle(tmp_path, oracle)
    assert oracle.settings[0].chat_template_kwargs is None
    assert "chat_template_kwargs" not in oracle.settings[0].to_dict()


# ---- the thinking budget ---------------------------------------------------------------------------------------------
def test_thinking_budget_is_added_to_every_steps_budget(tmp_path):
    plain, thinking = ThinkingOracle(f"[Better Answer] {LONGER} [End]"), ThinkingOracle(f"[Better Answer] {LONGER}")
    recycle(tmp_path / "a", plain)
    recycle(tmp_path / "b", thinking, max_thinking_tokens=300)
    assert thinking.settings[0].max_new_tokens == plain.settings[0].max_new_tokens + 300
    fixed = ThinkingOracle("Explain why, step by step.")
    recycle(tmp_path / "c", fixed, template_set="compact", mode="instruction", max_thinking_tokens=300)
    assert fixed.settings[0].max_new_tokens == 48 + 300  # a step with a fixed budget of its own gets it too
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        recycle(tmp_path / "d", plain, max_thinking_tokens=-1)


@pytest.mark.parametrize("template_set", ["paper", "compact"])
def test_budget_spent_on_thinking_is_a_counted_fallback_and_keeps_the_original(tmp_path, template_set):
    oracle = ThinkingOracle(LONGER, finish="length")
    out, recycler = recycle(tmp_path, oracle, template_set=template_set)
    assert out["response_reflection_fallback"] == ["thinking_truncated"]
    assert out["response_reflection_finish"] == ["length"]
    assert out["recycled_output"] == [ORIGINAL["output"]]
    stats = recycler.stats()
    assert stats["response_reflection/fallback/thinking_truncated"] == 1
    assert stats["response_reflection/accept_rate"] == 0
    (record,) = recycler.cache.records()
    assert THOUGHT in record["raw"]  # cached: a rerun with a larger budget is a new key, this one is not asked again


def test_thinking_truncated_is_listed_with_the_reasons_of_outputs_without_a_section():
    from reflect_trainer.parsing import UNPARSED_REASONS

    assert "thinking_truncated" in UNPARSED_REASONS


# ---- the engines hand the variables to the chat template -----------------------------------------------------------
CONVERSATIONS = [[{"role": "user", "content": "Say hi"}],
                 [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "[Better Answer] "}]]
THINKING_OFF = GenerationSettings(max_new_tokens=1, chat_template_kwargs={"enable_thinking": False})


def recording(monkeypatch, tokenizer) -> list[dict]:
    """Wrap the tokenizer's ``apply_chat_template``: returns the keyword arguments of every call."""
    calls, real = [], tokenizer.apply_chat_template

    def apply_chat_template(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", apply_chat_template)
    return calls


def test_transformers_engine_passes_the_template_kwargs_to_apply_chat_template(oracle_path, monkeypatch):
    from reflect_trainer.oracles.transformers_engine import TransformersOracle

    oracle = TransformersOracle(oracle_path, quantization="none", device="cpu", batch_size=2)
    calls = recording(monkeypatch, oracle.tokenizer)
    oracle.generate(CONVERSATIONS, THINKING_OFF)
    assert len(calls) == 2 and all(call.get("enable_thinking") is False for call in calls)
    calls.clear()
    oracle.generate(CONVERSATIONS, GenerationSettings(max_new_tokens=1))
    assert len(calls) == 2 and not any("enable_thinking" in call for call in calls)


class CapturingServer:
    """An OpenAI-compatible loopback server that records every request body and answers with ``reply(body)``: a
    ``(content, reasoning_content, finish_reason)`` triple, as vLLM's and llama.cpp's servers do with a reasoning
    parser on."""

    def __init__(self, reply=lambda body: ("[Better Answer] Hello there, friend! [End]", None, "stop")):
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "m", "root": "/weights/m"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                content, reasoning, finish = reply(body)
                message = {"role": "assistant", "content": content}
                if reasoning is not None:
                    message["reasoning_content"] = reasoning
                choice = {"message": message} if "messages" in body else {"text": content}
                self._send({"choices": [{**choice, "finish_reason": finish}], "usage": {"completion_tokens": 9}})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = CapturingServer()
    yield s
    s.close()


def test_http_engine_sends_chat_template_kwargs_in_the_request_body(server):
    from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle

    oracle = OpenAIHTTPOracle(base_url=server.url, served_model="m", concurrency=1)
    oracle.generate(CONVERSATIONS[:1], THINKING_OFF)
    oracle.generate(CONVERSATIONS[:1], GenerationSettings(max_new_tokens=8))
    assert server.bodies[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in server.bodies[1]  # unset: the request is what it was


def test_http_engine_with_a_local_tokenizer_renders_the_prompt_with_the_kwargs(server, oracle_path, monkeypatch):
    from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle

    oracle = OpenAIHTTPOracle(oracle_path, base_url=server.url, served_model="m", concurrency=1)
    calls = recording(monkeypatch, oracle.tokenizer)
    oracle.generate(CONVERSATIONS, THINKING_OFF)
    assert "prompt" in server.bodies[0]  # the /completions path: the template is applied here, not by the server
    assert len(calls) == 2 and all(call.get("enable_thinking") is False for call in calls)


def test_http_servers_separate_reasoning_is_kept_raw_and_judged_like_inline_thinking(tmp_path):
    from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle

    answers = iter([(f"[Better Answer] {LONGER} [End]", THOUGHT, "stop"), (None, THOUGHT, "length")])
    server = CapturingServer(reply=lambda body: next(answers))
    try:
        oracle = OpenAIHTTPOracle(base_url=server.url, served_model="m", concurrency=1)
        out, recycler = recycle(tmp_path / "a", oracle)
        assert out["recycled_output"] == [LONGER]
        assert THOUGHT in recycler.cache.records()[0]["raw"]
        out, recycler = recycle(tmp_path / "b", oracle)  # content null: the budget ran out while thinking
        assert out["response_reflection_fallback"] == ["thinking_truncated"]
        assert recycler.stats()["response_reflection/fallback/thinking_truncated"] == 1
    finally:
        server.close()
