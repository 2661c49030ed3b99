""""Accepted" means complete and not worse: the acceptance gates, on every engine and on injected outputs.

The engine tests use the real embedded oracle (transformers, llama.cpp, the self oracle); the HTTP one a loopback
server that reports ``finish_reason`` as OpenAI-compatible servers do. The gate tests inject oracle outputs (a
scripted oracle), since the point there is what the gates do with a given text.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.gates import ends_mid_sentence
from reflect_trainer.oracles import Generation, GenerationSettings
from test_support.data import LONGER, ORIGINAL
from test_support.oracles import ScriptedOracle
from test_support.recycling import recycle as recycle_with


def recycle(tmp_path, oracle, rows=None, **config):
    config = {"mode": "response", "template_set": "compact", **config}
    return recycle_with(rows or [ORIGINAL], oracle, tmp_path / "cache", **config)


def answering(generation: Generation):
    """A scripted oracle that answers every prompt with ``generation`` (fault and edge-case injection)."""
    return ScriptedOracle(lambda conversation: generation)


# ---- the gates, on injected outputs ----------------------------------------------------------------------------
def test_complete_longer_answer_is_accepted_and_trained_on(tmp_path):
    out, recycler = recycle(tmp_path, answering(Generation(LONGER, "stop")))
    assert out["response_reflection_fallback"] == [None]
    assert out["recycled_output"] == [LONGER]
    assert out["response_reflection_finish"] == ["stop"]
    assert recycler.stats()["response_reflection/accepted"] == 1


def test_section_cut_by_the_budget_falls_back_as_truncated(tmp_path):
    cut = LONGER[: LONGER.index("two days.") + 9]  # ends a sentence, yet the budget ended it: still cut off
    out, recycler = recycle(tmp_path, answering(Generation(cut, "length")))
    assert out["response_reflection_fallback"] == ["truncated"]
    assert out["recycled_output"] == [ORIGINAL["output"]]
    assert recycler.stats()["response_reflection/fallback/truncated"] == 1


def test_engine_without_finish_reason_is_judged_by_the_text(tmp_path):
    # A plain string (an engine that does not say why it stopped): an open section ending mid-sentence is cut.
    out, _ = recycle(tmp_path, ScriptedOracle(lambda c: LONGER[:-40]))
    assert out["response_reflection_fallback"] == ["truncated"]
    out, _ = recycle(tmp_path / "2", ScriptedOracle(lambda c: LONGER))
    assert out["response_reflection_fallback"] == [None]


@pytest.mark.parametrize("text", [
    LONGER + " The game is won by one team with one point. The game is won by one team with one point. Done.",
    "### Ingredients: 1. 1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14. 15. " + LONGER,
    LONGER + "\n1.\n2.\n3.\n4.\n",
    LONGER + '\n1. The answer is: "Drake"\n2. The answer is: "Drake"\n3. The answer is: "Drake"',
    # SmolLM2-135M's paragraph said again with a few words changed: too far apart for the n-gram window.
    "I'm here to help with your writing, and I'll do my best to assist you with your project. If you have any "
    "questions or need to adjust the scope, I can do that. Please let me know if you need any changes.\n\n"
    "I'm here to help with your writing, and I'll do my best to assist you. If you have any questions or need to "
    "adjust the scope, I can do that. Please let me know if you need any changes.",
], ids=["repeated-sentence", "counting-inline", "empty-list-items", "same-line-listed", "paragraph-said-again"])
def test_repetition_inside_the_output_falls_back_as_loop(tmp_path, text):
    out, _ = recycle(tmp_path, answering(Generation(text, "stop")))
    assert out["response_reflection_fallback"] == ["loop"]


def test_complete_but_shorter_answer_falls_back_unless_the_ratio_is_lowered(tmp_path):
    short = "Keep it in water on the counter."
    out, _ = recycle(tmp_path, answering(Generation(short, "stop")))
    assert out["response_reflection_fallback"] == ["shorter_than_original"]
    # Gates run on read: a lower ratio accepts the same cached output, with no oracle call.
    oracle = answering(Generation("never asked", "stop"))
    out, _ = recycle(tmp_path, oracle, min_length_ratio=0.3)
    assert out["response_reflection_fallback"] == [None] and out["recycled_output"] == [short]
    assert oracle.calls == 0


# What SmolLM2-135M wrote after its rewrite, on the demo's pairs (compact-response v2): comments on the answer or the
# draft, which the student never sees. The last one is a long answer of the same kind without any comment.
@pytest.mark.parametrize("tail, reason", [
    ("This is a more accurate and detailed response that provides additional context and clarity.", "meta_commentary"),
    ("In this response, I've added more detail to the original prompt.", "meta_commentary"),
    ("The original draft was too simplistic and didn't provide any clear recommendations.", "meta_commentary"),
    ("I'll make sure to be more accurate and detailed in the next response.", "meta_commentary"),
    ("Mint and parsley keep the same way; woody herbs such as rosemary prefer the fridge.", None),
])
def test_an_answer_that_comments_on_itself_or_the_draft_falls_back(tmp_path, tail, reason):
    text = LONGER + "\n\n" + tail
    out, _ = recycle(tmp_path, answering(Generation(text, "stop")))
    assert out["response_reflection_fallback"] == [reason]
    assert out["recycled_output"] == [ORIGINAL["output"] if reason else text]
    if reason:  # a gate, run on read: turned off, the same cached output is accepted without an oracle call
        oracle = answering(Generation("never asked", "stop"))
        out, _ = recycle(tmp_path, oracle, reject_meta_commentary=False)
        assert out["response_reflection_fallback"] == [None] and oracle.calls == 0


@pytest.mark.parametrize("added, reason", [
    (" you can use the following steps", "incomplete_instruction"),
    (" include two examples and", "incomplete_instruction"),
    (" give two examples and say which one you would use.", None),
])
def test_new_instruction_must_be_a_complete_request(tmp_path, added, reason):
    def script(conversation):
        if conversation[-1]["content"].startswith("[New Instruction]"):
            return Generation(added, "stop")
        return Generation(LONGER, "stop")

    out, _ = recycle(tmp_path, ScriptedOracle(script), mode="instruction")
    assert out["instruction_reflection_fallback"] == [reason]
    if reason is None:
        assert out["recycled_instruction"][0].endswith(added.strip())


def test_oracle_error_is_a_counted_fallback_and_never_cached(tmp_path):
    out, recycler = recycle(tmp_path, answering(Generation("", "error", error="oracle_error:400")))
    assert out["response_reflection_fallback"] == ["oracle_error:400"]
    assert recycler.stats()["response_reflection/fallback/oracle_error:400"] == 1
    assert len(recycler.cache) == 0
    oracle = answering(Generation(LONGER, "stop"))
    out, _ = recycle(tmp_path, oracle)  # the next run asks again, and this time gets an answer
    assert oracle.calls == 1 and out["response_reflection_fallback"] == [None]


def test_selective_mode_scores_the_original_where_a_rewrite_was_truncated(tmp_path):
    class RecordingScorer:
        identity, lockstep = "recording", False

        def __init__(self):
            self.texts = []

        def score(self, texts):
            from reflect_trainer.selection import PairScores

            self.texts += texts
            return [PairScores(ifd=0.5, reverse_ifd=0.5) for _ in texts]

    def script(conversation):
        if conversation[-1]["content"].startswith("[New Instruction]"):
            return Generation(" give two examples.", "stop")
        return Generation(LONGER[:80], "length")  # every answer is cut by the budget

    from datasets import Dataset

    scorer = RecordingScorer()
    recycler = Recycler(ReflectionConfig(cache_dir=str(tmp_path), mode="selective", template_set="compact",
                                         progress_bar=False), oracle=ScriptedOracle(script), scorer=scorer)
    out = recycler.recycle_dataset(Dataset.from_list([ORIGINAL]))
    assert out["a_fallback"] == ["truncated"] and out["response_reflection_fallback"] == ["truncated"]
    scored_answers = {answer for _, answer in scorer.texts}
    assert LONGER[:80].strip() not in scored_answers  # no cut answer reached the student
    assert ORIGINAL["output"] in scored_answers


# ---- every engine reports a budget cut -------------------------------------------------------------------------
SHORT_REPLY = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]


def long_reply(alpaca_pairs):
    return [{"role": "user", "content": alpaca_pairs[0]["instruction"]}]


def assert_engine_reports_budget_cuts(oracle, alpaca_pairs, tmp_path):
    settings = GenerationSettings(max_new_tokens=12)
    cut, short = oracle.generate([long_reply(alpaca_pairs), SHORT_REPLY], settings)
    assert cut.finish_reason == "length" and cut.text.strip()
    assert short.finish_reason == "stop" and len(short.text.split()) < 12
    # Through the recycler: an answer-writing step with a budget of 8 tokens is cut, and the cut falls back.
    rows = [{"instruction": alpaca_pairs[i]["instruction"], "input": "", "output": alpaca_pairs[i]["output"]}
            for i in range(2)]
    out, recycler = recycle(tmp_path, oracle, rows, max_new_tokens=8, length_budget_ratio=0)
    assert out["response_reflection_finish"] == ["length", "length"]
    assert out["response_reflection_fallback"] == ["truncated", "truncated"]
    assert [r["finish"] for r in recycler.cache.records()] == ["length", "length"]  # stored next to the raw text


@pytest.mark.slow
def test_transformers_engine_reports_budget_cuts(real_oracle, alpaca_pairs, tmp_path):
    assert_engine_reports_budget_cuts(real_oracle, alpaca_pairs, tmp_path)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_llama_cpp_engine_reports_budget_cuts(alpaca_pairs, tmp_path):
    from reflect_trainer.embedded import smollm2_gguf_path
    from reflect_trainer.oracles.llama_cpp_engine import LlamaCppOracle

    oracle = LlamaCppOracle(str(smollm2_gguf_path()), batch_size=4, context_length=2048, threads=1)
    try:
        assert_engine_reports_budget_cuts(oracle, alpaca_pairs, tmp_path)
    finally:
        oracle.close()


@pytest.mark.slow
def test_self_oracle_reports_budget_cuts(oracle_path, alpaca_pairs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reflect_trainer.oracles.self_oracle import SelfOracle

    student = get_peft_model(AutoModelForCausalLM.from_pretrained(oracle_path),
                             LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    oracle = SelfOracle(student, AutoTokenizer.from_pretrained(oracle_path), batch_size=4)
    assert_engine_reports_budget_cuts(oracle, alpaca_pairs, tmp_path)


class _FinishReasonServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that reports finish_reason the way vLLM and llama.cpp's server do: ``length``
    when max_tokens ran out. Its 'model' writes twenty words per answer."""

    WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
             "seventeen eighteen nineteen twenty.").split()

    def log_message(self, *args):
        pass

    def _send(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = request["max_tokens"]
        text = " ".join(self.WORDS[:n])
        reason = "length" if n < len(self.WORDS) else "stop"
        choice = {"index": 0, "finish_reason": reason}
        if self.path.endswith("/chat/completions"):
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send({"choices": [choice], "usage": {"completion_tokens": min(n, len(self.WORDS))}})


def test_http_engine_passes_the_servers_finish_reason_to_the_gates(tmp_path):
    from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FinishReasonServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        oracle = OpenAIHTTPOracle(base_url=f"http://127.0.0.1:{server.server_port}/v1", served_model="scripted")
        cut, whole = oracle.generate([SHORT_REPLY, SHORT_REPLY], GenerationSettings(max_new_tokens=5))[0], \
            oracle.generate([SHORT_REPLY], GenerationSettings(max_new_tokens=64))[0]
        assert (cut.text, cut.finish_reason) == ("one two three four five", "length")
        assert whole.finish_reason == "stop" and not ends_mid_sentence(whole.text)
        out, _ = recycle(tmp_path, oracle, max_new_tokens=5, length_budget_ratio=0)
        assert out["response_reflection_fallback"] == ["truncated"]
    finally:
        server.shutdown()


def test_inspect_prints_whole_rewrites_and_how_the_oracle_stopped(tmp_path, capsys):
    from reflect_trainer import save_recycled, to_sft_dataset
    from reflect_trainer.cli import main as cli_main

    out, _ = recycle(tmp_path, answering(Generation(LONGER, "stop")))
    path = save_recycled(to_sft_dataset(out), tmp_path / "recycled.jsonl")
    assert cli_main(["inspect", str(path), "-n", "1", "--width", "40"]) == 0
    shown = capsys.readouterr().out
    assert f"AFTER  A: {LONGER}\n" in shown  # in full, never shortened with "…"
    assert "response_reflection: accepted (oracle stopped: stop)" in shown


def test_progress_bar_moves_after_every_oracle_step_not_once_per_buffer(tmp_path, monkeypatch):
    import tqdm.auto
    from datasets import Dataset

    updates = []

    class RecordingBar(tqdm.auto.tqdm):
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)

    def script(conversation):
        if conversation[-1]["content"].startswith("[New Instruction]"):
            return Generation(" give two examples.", "stop")
        return Generation(LONGER, "stop")

    recycler = Recycler(ReflectionConfig(cache_dir=str(tmp_path), mode="both", template_set="compact"),
                        oracle=ScriptedOracle(script))
    recycler.recycle_dataset(Dataset.from_list([ORIGINAL] * 3), batch_size=3)
    # compact `both`: 2 instruction steps + 1 response step per pair, each advancing the bar by the batch's 3 pairs
    assert updates == [3, 3, 3]
    assert recycler._progress is None and sum(updates) == 3 * recycler._steps_per_pair()


def test_a_section_restarted_by_its_own_marker_and_cut_by_the_budget_is_truncated(tmp_path):
    # Seen in the demo: the oracle wrote "[New Answer]" again mid-answer and ran out of tokens in the second copy.
    # The first copy ends where the second marker starts ("... a list of examples:") — cut, though "closed".
    def script(conversation):
        if conversation[-1]["content"].startswith("[New Instruction]"):
            return Generation(" give two examples.", "stop")
        restarted = LONGER + " Here is a sample guide with a list of examples:\n\n[New Answer]\n\nStep 1. Provide"
        return Generation(restarted, "length")

    out, _ = recycle(tmp_path, ScriptedOracle(script), mode="instruction")
    assert out["instruction_reflection_fallback"] == ["truncated"]
    # The same restart that ended on its own (finish "stop") keeps the complete first copy.
    complete = LONGER + "\n\n[New Answer] " + LONGER
    out, _ = recycle(tmp_path / "2", ScriptedOracle(
        lambda c: Generation(" give two examples.", "stop") if c[-1]["content"].startswith("[New Instruction]")
        else Generation(complete, "stop")), mode="instruction")
    assert out["instruction_reflection_fallback"] == [None] and out["reflected_output"] == [LONGER]
