"""The recipe as users launch it: 2 processes under accelerate with DeepSpeed ZeRO-2/3, and kill -9 + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ROWS = 16


def recipe_args(tmp_path, *extra):
    return [
        str(ROOT / "recipes" / "llama7b_recycled.py"), "--config", str(ROOT / "recipes" / "cpu_smollm2.yaml"),
        "--dataset_limit", str(ROWS), "--mode", "response", "--max_new_tokens", "16", "--max_length", "128",
        "--per_device_train_batch_size", "2", "--buffer_batches", "2", "--num_train_epochs", "1",
        "--logging_steps", "1", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
        "--stats_file", str(tmp_path / "stats-{rank}.json"), *extra,
    ]


def launch_two_processes(tmp_path, *extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *recipe_args(tmp_path, *extra)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def cache_records(cache_dir):
    records = []
    for path in (cache_dir / "segments").glob("*.jsonl"):
        records += [json.loads(line.split(" ", 1)[1]) for line in path.read_text().splitlines() if line]
    return records


def test_two_ranks_with_deepspeed_zero2_recycle_each_pair_exactly_once(tmp_path):
    result = launch_two_processes(tmp_path, "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr  # the processes exited cleanly
    stats = [json.loads((tmp_path / f"stats-{rank}.json").read_text()) for rank in (0, 1)]
    # 16 pairs, 2 ranks x batch 2: 4 optimizer steps on each rank
    assert [s["global_step"] for s in stats] == [4, 4]
    # Each rank recycled its own shard: 8 pairs each, 16 oracle prompts in all, 16 distinct records, none twice.
    assert [s["oracle_prompts"] for s in stats] == [8, 8]
    keys = [r["key"] for r in cache_records(tmp_path / "cache")]
    assert len(keys) == len(set(keys)) == ROWS
    assert not any(s["oracle_loaded_at_end"] for s in stats)  # released once the rank's share was done
    assert [s["deepspeed_zero_stage"] for s in stats] == [2, 2]


def test_two_ranks_with_zero3_recycle_each_pair_once_and_select_with_the_sharded_student(tmp_path):
    """ZeRO-3 and selective reflection at once. Scoring is a forward pass of the ZeRO-3 student, collective across
    ranks: every rank must join each one, or the run hangs."""
    rows = 8  # half the data set of the other tests: selective mode asks the oracle three times per pair
    result = launch_two_processes(tmp_path, "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
                                  "--mode", "selective", "--recycled_out", str(tmp_path / "recycled.jsonl"),
                                  "--dataset_limit", str(rows))  # the last --dataset_limit wins
    assert result.returncode == 0, result.stderr[-4000:]
    assert "terminate called" not in result.stderr
    stats = [json.loads((tmp_path / f"stats-{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["global_step"] for s in stats] == [2, 2]
    assert [s["deepspeed_zero_stage"] for s in stats] == [3, 3]
    assert not any(s["oracle_loaded_at_end"] for s in stats)
    # Each rank picked versions for its 4 pairs while training, then for the other rank's 4 while exporting
    # (texts and scores read from the shared cache: that rank had stored them).
    for s in stats:
        assert sum(s.get(f"selected/{v}", 0) for v in ("original", "q", "a", "qa")) == rows
        assert s["scores_computed"] > 0  # every rank scored its own pairs (collectively, in lockstep)
    records = cache_records(tmp_path / "cache")
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys))  # no text generated, and no score stored, twice
    assert sum(s["oracle_prompts"] for s in stats) == sum(r.get("kind") != "scores" for r in records)
    assert sum(s["scores_computed"] for s in stats) == sum(r.get("kind") == "scores" for r in records) > 0
    exported = [json.loads(line) for line in (tmp_path / "recycled.jsonl").read_text().splitlines()]
    assert len(exported) == rows and all(row["selected_version"] in ("original", "q", "a", "qa") for row in exported)
    assert all(row["ifd_qa"] > 0 and row["rifd_original"] > 0 for row in exported)


def test_kill_9_during_epoch_one_then_resume_recomputes_nothing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = recipe_args(tmp_path, "--save_strategy", "steps", "--save_steps", "2", "--num_train_epochs", "2")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "out" / "checkpoint-4"
    deadline = time.time() + 600
    while time.time() < deadline and not (checkpoint / "trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)  # epoch 1 has 8 steps: killed mid-epoch, mid-recycling
    proc.wait()
    before = {r["key"] for r in cache_records(tmp_path / "cache")}
    assert 0 < len(before) < ROWS

    resumed = subprocess.run([sys.executable, *args, "--resume_from_checkpoint", "last"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    stats = json.loads((tmp_path / "stats-0.json").read_text())
    assert stats["global_step"] == 16  # two epochs of 8 steps completed
    assert stats["oracle_prompts"] == ROWS - len(before)  # only pairs not cached before the kill
    keys = [r["key"] for r in cache_records(tmp_path / "cache")]
    assert len(keys) == len(set(keys)) == ROWS  # no pair went to the oracle twice


def test_seven_b_config_fails_at_once_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "llama7b_recycled.py"), "--config",
         str(ROOT / "recipes" / "llama7b_recycled.yaml"), "--output_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr and "cpu_smollm2.yaml" in result.stderr
    # "At once": before any model (student or oracle) is loaded, not after minutes of loading 7B weights.
    assert "Loading weights" not in result.stderr and "loading oracle" not in result.stderr
