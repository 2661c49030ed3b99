"""`make demo` end to end: the commands of the Makefile's demo target, read from the Makefile itself, with the
recipe's exact config. Only the number of pairs (2 of the demo's 32) and where the outputs go are overridden."""

import html
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_support.cache_files import stored_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PAIRS = 2
DEMO_EXPORT = "runs/cpu_smollm2/recycled.jsonl"


def demo_commands() -> list[list[str]]:
    """The recipe lines of the Makefile's ``demo`` target, continuation lines joined, split as the shell would."""
    text = (ROOT / "Makefile").read_text()
    body = text.split("\ndemo:", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in body.splitlines()[1:] if line.startswith("\t")]


def test_make_demo_commands_recycle_train_inspect_and_report_with_the_exact_demo_config(tmp_path, capsys):
    from reflect_trainer.cli import main
    from reflect_trainer.embedded import load_alpaca_eval

    launch, inspect, report = demo_commands()
    assert launch[:2] == [".venv/bin/accelerate", "launch"] and "recipes/cpu_smollm2.yaml" in launch
    assert inspect[:2] == [".venv/bin/reflect-trainer", "inspect"]
    assert report[:2] == [".venv/bin/reflect-trainer", "report"]
    export = tmp_path / "recycled.jsonl"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch[2:],
           "--dataset_limit", str(PAIRS), "--output_dir", str(tmp_path / "out"), "--cache_dir",
           str(tmp_path / "cache"), "--stats_file", str(tmp_path / "stats.json"), "--recycled_out", str(export)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["global_step"] == 2  # 2 pairs in one batch of 4, 2 epochs
    assert stats["rows_recycled"] == PAIRS and stats["oracle_tokens"] > 0
    # Every prompt went to the oracle once and was stored once: per pair "make the request more demanding" and
    # "better answer", plus "answer the new instruction" for each new instruction that parsed.
    records = stored_records(tmp_path / "cache")
    assert 2 * PAIRS <= stats["oracle_prompts"] == len(records) <= 3 * PAIRS
    assert (tmp_path / "out" / "model.safetensors").exists()
    pairs = load_alpaca_eval(limit=PAIRS, max_answer_words=30)  # the demo's data: answers of at most 30 words
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert [r["original_instruction"] for r in rows] == pairs["instruction"]
    for row in rows:  # what the oracle wrote, as the cache stored it, is in the export
        assert row["instruction_reflection_raw"].strip() and row["response_reflection_raw"].strip()

    # The Makefile's next two commands, on this export (reflect-trainer is reflect_trainer.cli:main).
    capsys.readouterr()
    assert main([*(str(export) if arg == DEMO_EXPORT else arg for arg in inspect[1:])]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{PAIRS} rows in {export}")
    assert all(f"AFTER  A: {row['recycled_output']}" in printed for row in rows)
    assert main([*(str(export) if arg == DEMO_EXPORT else arg for arg in report[1:])]) == 0
    page = Path(f"{export}.report.html").read_text()
    assert all(html.escape(row["original_instruction"][:40]) in page for row in rows)
