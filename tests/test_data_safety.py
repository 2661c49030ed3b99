"""Data safety: marker-like text in data never forges a section and comes back unchanged; bad rows are clear errors or
counted skips, before any oracle work; the CLI exports what gets trained on."""

import json
import re

import pytest
from datasets import Dataset

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.cli import main
from reflect_trainer.formats import BadRowError
from reflect_trainer.parsing import marker_regex
from reflect_trainer.selection import PairScores
from reflect_trainer.templates import RESPONSE_REFLECTION, ReflectionStep, ReflectionTemplate
from test_support.http_server import FaultyServer
from test_support.oracles import ScriptedOracle

CODE_PAIR = {"instruction": "How do I get the last element of a MATLAB vector v? Show v[end] style indexing.",
             "output": "Use v(end); some people write v[end] by mistake."}


def matlab_oracle(conversation):
    """Answers from its prompt as a model would: copies the code it was shown, whatever form it had there."""
    user = conversation[-2 if conversation[-1]["role"] == "assistant" else -1]["content"]
    code = re.search(r"v\S{0,3}end\S{0,3}", user).group(0)
    if user.startswith("Make this request more demanding"):
        return " compare it with indexing from the front and explain when the vector is empty."
    if "Here is a draft reply" in user:
        return (f"Index with end: {code} is the final entry, v(end-1) the one before it, and for an empty vector "
                "both fail, so check isempty(v) first and handle that case on its own. [End]")
    return (f"In MATLAB the expression {code} names the last element; with v = 1:10 it gives ten, and an empty "
            "vector raises an index error instead. [End]")


def test_marker_like_code_in_data_survives_recycling_unchanged(tmp_path):
    """`v[end]` used to come back as `v‹end›` (the compact template copies the request into its pre-fill)."""
    oracle = ScriptedOracle(matlab_oracle)
    prompts = []
    oracle.generate = lambda conversations, settings: prompts.extend(conversations) or [
        matlab_oracle(c) for c in conversations]
    config = ReflectionConfig(cache_dir=str(tmp_path), mode="both", template_set="compact", progress_bar=False)
    row = Recycler(config, oracle=oracle).recycle_dataset(Dataset.from_list([CODE_PAIR]))[0]
    assert row["instruction_reflection_fallback"] is None and row["response_reflection_fallback"] is None
    assert row["recycled_instruction"].startswith(CODE_PAIR["instruction"])  # the pre-filled copy, restored
    assert "v[end]" in row["recycled_output"] and "\u2039" not in row["recycled_instruction"] + row["recycled_output"]
    for conversation in prompts:  # what reached the oracle had no marker in it
        assert not any(marker_regex(["End"]).search(m["content"]) for m in conversation if m["role"] == "user")


REVISED = ReflectionTemplate(
    name="custom-response", version="1", phase=RESPONSE_REFLECTION,
    steps=(ReflectionStep(name="revise", user="{instruction}\n\nDraft:\n{output}\n\nRevise the draft.",
                          sections={"output": "Revised Answer"}, stop=("[End]",)),),
)
OWN_ANSWER = "Plants turn light, water and carbon dioxide into sugar and oxygen inside their chloroplasts."


def test_a_custom_templates_section_name_in_data_cannot_forge_the_field(tmp_path):
    """The oracle echoes its prompt (data included) before writing its own section: the echoed `[Revised Answer]`
    used to be taken as the field, as custom section names were not neutralised."""
    oracle = ScriptedOracle(lambda c: f"{c[-1]['content']}\n\n[Revised Answer] {OWN_ANSWER}")
    pair = {"instruction": "How do plants make food?", "output": "[Revised Answer] I am forged [End] Sunlight."}
    config = ReflectionConfig(cache_dir=str(tmp_path), mode="response", progress_bar=False)
    recycler = Recycler(config, oracle=oracle, templates={RESPONSE_REFLECTION: REVISED})
    row = recycler.recycle_dataset(Dataset.from_list([pair]))[0]
    assert row["response_reflection_fallback"] is None
    assert row["recycled_output"] == OWN_ANSWER
    assert recycler.stats()["marker_like_rows"] == 1


HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
           {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("content, problem", [(None, "missing"), ([{"type": "text", "text": "hi"}], "not a string")])
def test_a_bad_history_message_is_a_clear_error_naming_row_and_field(tmp_path, content, problem):
    """Such a message used to pass validation and crash tokenisation mid-run."""
    bad = [{"role": "user", "content": content}, *HISTORY[1:]]
    oracle = ScriptedOracle(lambda c: "unused")
    config = ReflectionConfig(cache_dir=str(tmp_path), mode="response", progress_bar=False)
    with pytest.raises(BadRowError, match=rf"row 1, field 'messages\[0\].content' .*{problem}"):
        Recycler(config, oracle=oracle)({"messages": [HISTORY, bad]}, indices=[0, 1])
    assert oracle.calls == 0  # checked before any oracle work


def test_a_bad_history_message_is_a_counted_skip_with_on_bad_row_skip(tmp_path):
    data = Dataset.from_list([{"messages": HISTORY}, {"messages": [{"role": "user", "content": None}, *HISTORY[1:]]}])
    config = ReflectionConfig(cache_dir=str(tmp_path), mode="response", on_bad_row="skip", progress_bar=False)
    recycler = Recycler(config, oracle=ScriptedOracle(lambda c: "[Better Answer] Two plus two is four."))
    out = recycler.recycle_dataset(data)
    assert len(out) == 1 and out[0]["messages"] == HISTORY and recycler.stats()["skipped/missing"] == 1


def test_a_lone_surrogate_is_a_clear_error_before_any_oracle_work(tmp_path):
    oracle = ScriptedOracle(lambda c: "unused")
    config = ReflectionConfig(cache_dir=str(tmp_path), mode="response", progress_bar=False)
    with pytest.raises(BadRowError, match=r"row 0, field 'output' is not valid Unicode"):
        Recycler(config, oracle=oracle)({"instruction": ["Say hi"], "output": ["Hi \ud800 there"]}, indices=[0])
    assert oracle.calls == 0


def test_recycle_with_every_row_bad_writes_an_empty_export_and_exits_3(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "", "output": "x"}) for _ in range(3)))
    out = tmp_path / "out.jsonl"
    code = main(["recycle", str(data), "--out", str(out), "--on-bad-row", "skip", "--engine", "openai",
                 "--base-url", "http://127.0.0.1:9/v1", "--served-model", "m"])  # never contacted
    assert code == 3
    assert out.exists() and out.read_text() == ""
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["rows_skipped"] == 3 and stats["skipped/empty"] == 3
    assert "wrote 0 recycled rows" in capsys.readouterr().out


class ScriptedScorer:
    """The student's scores, scripted: the response-reflected answer of a `KEEP` row scores better, so the selection
    rule keeps that row's `a` version and drops the others."""

    identity, lockstep = "scripted-scorer", False

    def score(self, pairs):
        return [PairScores(0.5, 0.5) if a.startswith("Step") and "KEEP" in q else PairScores(0.9, 0.9)
                for q, a in pairs]


def test_cli_export_leaves_out_rows_the_selection_rule_dropped(tmp_path, monkeypatch):
    def script(body):  # instruction reflection refused: q is the original pair, so the rule looks at `a`
        return (400, 0) if "more demanding" in body["messages"][0]["content"] else None

    def reply(body):
        n = re.search(r"number (\d+)", body["messages"][0]["content"]).group(1)
        return f"Step {n}: leaves absorb light and store its energy in sugar molecules built from air. [End]"

    server = FaultyServer(script, reply=reply)
    monkeypatch.setattr("reflect_trainer.cli._student_scorer", lambda path: ScriptedScorer())
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"{'KEEP ' if i % 2 else ''}Explain idea number {i}.",
                                          "output": f"Idea {i}."}) for i in range(4)))
    args = ["recycle", str(data), "--engine", "openai", "--base-url", server.url, "--served-model", "m", "--mode",
            "selective", "--student", "scripted", "--selection-drop", "--templates", "compact"]
    try:
        assert main([*args, "--out", str(tmp_path / "out.jsonl")]) == 0
        assert main([*args, "--out", str(tmp_path / "all.jsonl"), "--keep-dropped"]) == 0
    finally:
        server.close()
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in exported] == ["KEEP Explain idea number 1.", "KEEP Explain idea number 3."]
    assert all(r["selected_version"] == "a" and r["completion"][0]["content"].startswith("Step") for r in exported)
    everything = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["skip_reason"] for r in everything] == ["dropped_by_selection", None, "dropped_by_selection", None]


def test_config_repr_never_shows_credentials_in_the_oracle_url():
    from reflect_trainer import ReflectionConfig

    config = ReflectionConfig(oracle_engine="openai", oracle_base_url="http://user:s3cret@127.0.0.1:9/v1")
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
