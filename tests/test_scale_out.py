"""`reflect-trainer recycle` data-parallel under torchrun: real processes, the real oracle, real pairs."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import reflect_trainer
from reflect_trainer.cli import main
from reflect_trainer.distributed import Launch, detect_launch, pin_local_gpu, shard_indices
from test_support.cache_files import records_by_writer

MAX_NEW_TOKENS = 8


def recycle_args(src, out, cache_dir):
    return ["recycle", str(src), "--out", str(out), "--cache-dir", str(cache_dir), "--mode", "response",
            "--templates", "compact", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2"]


def stored_keys(cache_dir):
    """Every record in every segment, by key: how many times each prompt was generated and stored; and the writers
    that stored any."""
    by_writer = records_by_writer(cache_dir)
    keys = Counter(r["key"] for records in by_writer.values() for r in records)
    return keys, {writer for writer, records in by_writer.items() if records}


def test_batches_are_dealt_to_ranks_whole_and_in_turn():
    assert shard_indices(7, 2, 0, 2) == [0, 1, 4, 5]
    assert shard_indices(7, 2, 1, 2) == [2, 3, 6]
    assert shard_indices(3, 2, 2, 3) == []  # more ranks than batches: the last rank has none


def test_launch_is_read_from_what_torchrun_and_accelerate_set():
    assert detect_launch({}) == detect_launch({"WORLD_SIZE": "1"})
    launch = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.distributed) == (3, 4, 1, True)
    with pytest.raises(ValueError, match="RANK=4"):
        detect_launch({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_rank_on_a_node_sees_only_its_own_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    pin_local_gpu(Launch(rank=9, world_size=16, local_rank=4))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"  # local rank 4 of 3 visible devices: the second
    pin_local_gpu(Launch())  # one process: left alone
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


@pytest.mark.slow
def test_two_torchrun_ranks_export_what_one_process_exports_and_generate_each_prompt_once(tmp_path):
    from reflect_trainer.embedded import load_alpaca_eval

    rows = load_alpaca_eval(limit=4, max_answer_words=30).to_list()
    # Row 4 repeats row 2: batches [0, 1] [2, 3] [4] put it on rank 0 and its twin on rank 1, so the prompt is
    # wanted by both ranks at once (the cache's claim decides who generates it).
    rows.append(dict(rows[2]))
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank below: the float sums, hence greedy ties, are the same
    try:
        assert main(recycle_args(src, tmp_path / "one.jsonl", tmp_path / "one.cache")) == 0
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(reflect_trainer.__file__).parents[1])}
    two = recycle_args(src, tmp_path / "two.jsonl", tmp_path / "two.cache")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "reflect_trainer.cli", *two], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    keys, writers = stored_keys(tmp_path / "two.cache")
    assert len(keys) == 4 and set(keys.values()) == {1}  # 5 rows, 4 distinct prompts, each generated once
    assert len(writers) == 2  # both ranks generated
    assert keys.keys() == stored_keys(tmp_path / "one.cache")[0].keys()
    stats = json.loads((tmp_path / "two.jsonl.stats.json").read_text())
    assert stats["world_size"] == 2 and stats["oracle_prompts"] == 4 and stats["rows_recycled"] == 5
