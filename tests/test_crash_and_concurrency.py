"""Real processes with the real oracle: kill -9 mid-run, and two writers on one cache at once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from reflect_trainer import Recycler, ReflectionConfig
from test_support.cache_files import stored_records
from test_support.data import short_pairs
from test_support.oracles import CountingOracle

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 16


def cli(*args):
    # nf4: the same (quantized) oracle identity as the `real_oracle` fixture, so the cache written here serves it.
    return [sys.executable, "-m", "reflect_trainer.cli", "recycle", *args, "--mode", "response", "--templates",
            "compact", "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "4", "--quantization", "nf4"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kill_9_loses_at_most_the_batch_in_flight(tmp_path, alpaca_pairs, real_oracle):
    data = short_pairs(24)
    src = write_rows(tmp_path / "rows.jsonl", data.to_list())
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen(cli(str(src), "--out", str(tmp_path / "out.jsonl"), "--cache-dir", str(cache_dir)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(stored_records(cache_dir)) < 4:
        assert proc.poll() is None, "the recycler finished or died before it could be killed"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: the second batch of 4 is being generated
    proc.wait()
    committed = len(stored_records(cache_dir))
    assert 4 <= committed < 24

    oracle = CountingOracle(real_oracle)
    config = ReflectionConfig(cache_dir=str(cache_dir), mode="response", template_set="compact",
                              max_new_tokens=MAX_NEW_TOKENS, progress_bar=False)
    recycler = Recycler(config, oracle=oracle)
    assert len(recycler.cache) == committed  # the cache opens and keeps every committed row
    out = recycler.recycle_dataset(data, batch_size=4)
    assert len(oracle.prompts) == 24 - committed  # only the missing rows went to the oracle
    assert all(raw is not None for raw in out["response_reflection_raw"])
    assert len(recycler.cache) == 24


def test_two_processes_on_overlapping_shards_store_every_row_exactly_once(tmp_path, alpaca_pairs):
    rows = short_pairs(16).to_list()
    shard_a = write_rows(tmp_path / "a.jsonl", rows[0:12])
    shard_b = write_rows(tmp_path / "b.jsonl", rows[4:16])
    cache_dir = tmp_path / "cache"
    procs = [
        # One torch thread each: two processes with two threads each on two cores spin against each other.
        subprocess.Popen(cli(str(shard), "--out", str(tmp_path / f"{name}.out.jsonl"), "--cache-dir", str(cache_dir)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for name, shard in (("a", shard_a), ("b", shard_b))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    records = stored_records(cache_dir)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 16  # no row lost, none stored twice
    out_a = [json.loads(line) for line in (tmp_path / "a.out.jsonl").read_text().splitlines()]
    out_b = [json.loads(line) for line in (tmp_path / "b.out.jsonl").read_text().splitlines()]
    assert len(out_a) == len(out_b) == 12
    # The overlap (rows 4..11) was recycled once and both processes report the same result.
    assert [r["recycled_output"] for r in out_a[4:]] == [r["recycled_output"] for r in out_b[:8]]
    assert not list((cache_dir / "claims").iterdir())
    shown = subprocess.run([sys.executable, "-m", "reflect_trainer.cli", "inspect", str(tmp_path / "a.out.jsonl"),
                            "-n", "2"], capture_output=True, text=True, check=True).stdout
    assert "12 rows" in shown and shown.count("BEFORE Q:") == 2 and "response_reflection: {" in shown
