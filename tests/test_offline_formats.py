"""The offline CLI reads every SFT format the trainer does, through the same codec (``formats.row_to_pair``): ShareGPT
``conversations`` are recycled with the real oracle, history kept; a conversation with no final user → assistant
exchange and pre-tokenized rows are passed through and counted, not refused and not silently dropped."""

import json

from reflect_trainer.cli import main
from test_support.data import shortest_pairs

SYSTEM = {"from": "system", "value": "You are a helpful assistant."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_recycles_sharegpt_conversations_with_the_real_oracle_and_counts_the_rest(tmp_path, capsys):
    pairs = shortest_pairs(3)
    history = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello! How can I help?"}]
    rows = [{"conversations": [SYSTEM, {"from": "human", "value": p["instruction"]},
                               {"from": "gpt", "value": p["output"]}]} for p in pairs[:2]]
    rows.append({"conversations": [*history, {"from": "human", "value": pairs[2]["instruction"]},
                                   {"from": "gpt", "value": pairs[2]["output"]}]})
    rows.append({"conversations": [{"from": "human", "value": "Are you there?"}]})  # no reply to recycle
    out = tmp_path / "out.jsonl"
    code = main(["recycle", str(write_jsonl(tmp_path / "sharegpt.jsonl", rows)), "--out", str(out), "--mode",
                 "response", "--max-new-tokens", "48", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["rows_recycled"] == 3 and stats["rows_passed_through"] == 1 and stats["rows_skipped"] == 0
    assert stats["oracle_prompts"] >= 3  # the real oracle was asked for each exchange
    assert "1 rows had no user→assistant exchange to recycle" in capsys.readouterr().out
    exported = read_jsonl(out)
    assert len(exported) == 3  # the passed-through row has no pair for the prompt/completion export
    for row, pair in zip(exported, pairs):
        assert row["prompt"][-1] == {"role": "user", "content": pair["instruction"]}  # response mode: question kept
        answer = row["completion"][0]["content"]
        assert answer == row["recycled_output"]
        if row["response_reflection_fallback"] is None:
            assert answer != pair["output"] and row["response_reflection_raw"]  # the oracle's rewrite, accepted
        else:
            assert answer == pair["output"]  # a counted fallback keeps the original
    assert exported[0]["prompt"][0] == {"role": "system", "content": SYSTEM["value"]}
    assert exported[2]["prompt"][:2] == [{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello! How can I help?"}]
    assert exported[2]["original_conversations"] == rows[2]["conversations"]


def test_cli_passes_pre_tokenized_rows_through_unchanged_without_an_oracle_call(tmp_path, capsys):
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    out = tmp_path / "out.jsonl"
    code = main(["recycle", str(write_jsonl(tmp_path / "tokens.jsonl", rows)), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats["rows_passed_through"] == 2 and stats["rows_recycled"] == 0 and stats["oracle_calls"] == 0
    exported = read_jsonl(out)
    assert [{k: r[k] for k in ("input_ids", "labels")} for r in exported] == rows
    assert "2 rows had no user→assistant exchange to recycle" in capsys.readouterr().out
