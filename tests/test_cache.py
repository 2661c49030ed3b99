"""The cache on its own: durable appends, torn writes, several writers, claims."""

import os
import subprocess
import sys

from reflect_trainer.cache import RecycleCache, cache_key


def test_records_survive_reopen_and_are_seen_by_other_writers(tmp_path):
    a, b = RecycleCache(tmp_path), RecycleCache(tmp_path)
    a.put_many([{"key": "k1", "raw": "one"}, {"key": "k2", "raw": "two"}])
    assert "k1" not in b
    b.refresh()
    assert b.get("k2")["raw"] == "two"
    a.close()
    assert RecycleCache(tmp_path).get("k1")["raw"] == "one"


def test_torn_and_corrupt_lines_are_ignored_and_cache_still_opens(tmp_path):
    cache = RecycleCache(tmp_path)
    cache.put_many([{"key": "good", "raw": "kept"}])
    segment = next((tmp_path / "segments").glob("*.jsonl"))
    with open(segment, "ab") as f:
        f.write(b'deadbeef {"key":"bad","raw":"checksum mismatch"}\n')  # a corrupt whole line
        f.write(b'0badc0de {"key":"torn","ra')  # a write cut by kill -9
    reopened = RecycleCache(tmp_path)
    assert reopened.get("good")["raw"] == "kept"
    assert "bad" not in reopened and "torn" not in reopened and len(reopened) == 1


def test_claims_are_exclusive_and_released_on_store(tmp_path):
    a, b = RecycleCache(tmp_path), RecycleCache(tmp_path)
    assert a.try_claim("k") and not b.try_claim("k")
    a.put_many([{"key": "k", "raw": "x"}])
    assert not (tmp_path / "claims" / "k").exists()
    assert b.wait_for(["k"], poll=0.01) == [] and b.get("k")["raw"] == "x"


def test_claim_of_a_dead_process_is_taken_over(tmp_path):
    # A process claims a key and dies without storing it (kill -9 mid-generation).
    code = f"from reflect_trainer.cache import RecycleCache; RecycleCache({str(tmp_path)!r}).try_claim('k')"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "claims" / "k").exists()
    survivor = RecycleCache(tmp_path)
    assert survivor.wait_for(["k"], poll=0.01) == ["k"]  # reported as orphaned, not waited on forever
    assert survivor.try_claim("k")


def test_claim_on_another_host_expires_after_timeout(tmp_path):
    other = RecycleCache(tmp_path)
    other.host = "some-other-node"
    assert other.try_claim("k")
    fresh = RecycleCache(tmp_path, claim_timeout=3600)
    assert not fresh.try_claim("k")
    os.utime(tmp_path / "claims" / "k", (0, 0))  # an hour-old claim from a node that went away
    assert fresh.try_claim("k")


def test_cache_key_depends_on_every_part_of_the_payload():
    base = {"phase": "p", "template": "t@1", "oracle": "o", "generation": {"max_new_tokens": 8}, "messages": []}
    keys = {cache_key(base)}
    for field, value in [("phase", "q"), ("template", "t@2"), ("oracle", "o2"), ("generation", {"max_new_tokens": 9}),
                         ("messages", [{"role": "user", "content": "x"}])]:
        keys.add(cache_key({**base, field: value}))
    assert len(keys) == 6
