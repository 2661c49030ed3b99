"""The cache on its own: durable appends, torn writes, several writers, claims."""

import os
import subprocess
import sys
import time

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


def test_claims_are_exclusive_and_released_only_by_their_owner(tmp_path):
    a, b = RecycleCache(tmp_path), RecycleCache(tmp_path)
    assert a.try_claim("k") and not b.try_claim("k")
    claim = (tmp_path / "claims" / "k").read_bytes()
    b.release("k")  # not b's claim: left alone
    assert (tmp_path / "claims" / "k").read_bytes() == claim
    a.release("k")
    assert not (tmp_path / "claims" / "k").exists()
    assert b.try_claim("k")


def test_claim_of_a_dead_process_is_taken_over_at_once(tmp_path):
    # A process claims a key and dies without storing it (kill -9 mid-generation). With an hour-long lease, only
    # the dead owner's pid tells: the survivor must not wait for the lease.
    code = f"from reflect_trainer.cache import RecycleCache; RecycleCache({str(tmp_path)!r}).try_claim('k')"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "claims" / "k").exists()
    survivor = RecycleCache(tmp_path, claim_lease_seconds=3600)
    fetched = survivor.get_or_generate(["k"], lambda keys: ([{"key": k, "raw": "redone"} for k in keys], {}))
    assert fetched.taken_over == 1 and fetched.generated == 1 and fetched.records["k"]["raw"] == "redone"
    assert not (tmp_path / "claims" / "k").exists()


def test_claim_on_another_host_expires_when_its_heartbeat_stops_on_the_waiters_own_clock(tmp_path):
    other = RecycleCache(tmp_path)
    other._owner.update(host="some-other-node", boot="another-boot-id")
    assert other.try_claim("k")
    fresh = RecycleCache(tmp_path, claim_lease_seconds=0.5)
    assert not fresh.try_claim("k")  # first sight: the lease starts now, on this process's clock
    os.utime(tmp_path / "claims" / "k", (0, 0))  # an mtime from 1970 (a server clock far off) decides nothing...
    assert not fresh.try_claim("k")  # ...it is only a heartbeat: seen to change, so the lease starts again
    time.sleep(0.7)  # then no heartbeat for longer than the lease
    assert fresh.try_claim("k")


def test_get_or_generate_serves_hits_generates_misses_and_keeps_failed_rows_uncached(tmp_path):
    cache = RecycleCache(tmp_path)
    cache.put_many([{"key": "old", "raw": "stored before"}])
    asked = []

    def generate(keys):
        asked.append(list(keys))
        return [{"key": "new", "raw": "fresh"}], {"bad": {"key": "bad", "raw": "", "error": "timeout"}}

    fetched = cache.get_or_generate(["old", "new", "bad", "new"], generate)
    assert asked == [["new", "bad"]]
    assert (fetched.hits, fetched.misses, fetched.generated, fetched.failed) == (1, 3, 2, 1)
    assert fetched.records["old"]["raw"] == "stored before" and fetched.records["new"]["raw"] == "fresh"
    assert fetched.records["bad"]["error"] == "timeout"
    reopened = RecycleCache(tmp_path)
    assert "new" in reopened and "bad" not in reopened  # the failed row is asked again next time
    assert not list((tmp_path / "claims").iterdir())


def test_record_stored_by_another_writer_between_our_look_and_our_claim_is_counted_and_not_generated(tmp_path):
    # The race behind a flaky 2-rank run: rank B looks (miss), rank A stores the pair and frees its claim, B's claim
    # then succeeds. B must use A's record, and count it as another writer's (it was counted as nothing before).
    writer_a, writer_b = RecycleCache(tmp_path), RecycleCache(tmp_path)
    real_acquire = writer_b._acquire

    def acquire_after_a_stored(key, *args, **kwargs):
        if key not in writer_a:
            writer_a.put_many([{"key": key, "raw": "from A"}])
        return real_acquire(key, *args, **kwargs)

    writer_b._acquire = acquire_after_a_stored

    def generate(keys):
        raise AssertionError(f"generated {keys} a second time")

    fetched = writer_b.get_or_generate(["shared"], generate)
    assert fetched.records["shared"]["raw"] == "from A"
    assert (fetched.hits, fetched.misses, fetched.generated, fetched.waited) == (0, 1, 0, 1)
    assert not list((tmp_path / "claims").iterdir())


def test_key_claimed_by_another_writer_that_lands_while_we_generate_ours_is_counted_as_theirs(tmp_path):
    # The race behind a flaky 2-rank run (CI, 2026-12-04): rank B meets rank A's claim on a shared pair, generates its
    # own pairs meanwhile, and A's record lands before B would start waiting. B generated the shared pair neither
    # time; it used A's record, so it must count it as another writer's (it was counted as nothing: 0 hits, 0 waits).
    writer_a, writer_b = RecycleCache(tmp_path), RecycleCache(tmp_path)
    assert writer_a.try_claim("shared")
    generated = []

    def generate(keys):
        generated.extend(keys)
        writer_a.put_many([{"key": "shared", "raw": "from A"}])  # A finishes while B's oracle call runs
        writer_a.release("shared")
        return [{"key": k, "raw": "from B"} for k in keys], {}

    fetched = writer_b.get_or_generate(["own", "shared"], generate)
    assert generated == ["own"]
    assert fetched.records["shared"]["raw"] == "from A" and fetched.records["own"]["raw"] == "from B"
    assert (fetched.hits, fetched.misses, fetched.generated, fetched.waited) == (0, 2, 1, 1)
    assert not list((tmp_path / "claims").iterdir())


def test_lone_surrogate_in_oracle_text_is_stored_and_read_back_unchanged(tmp_path):
    text = "broken \ud83d emoji half and a normal é"
    RecycleCache(tmp_path).put_many([{"key": "s", "raw": text}, {"key": "t", "raw": "plain ü"}])
    reopened = RecycleCache(tmp_path)
    assert reopened.get("s")["raw"] == text and reopened.get("t")["raw"] == "plain ü"
    assert cache_key({"messages": [{"content": text}]}) != cache_key({"messages": [{"content": "broken"}]})


def test_cache_key_depends_on_every_part_of_the_payload():
    base = {"phase": "p", "template": "t@1", "oracle": "o", "generation": {"max_new_tokens": 8}, "messages": []}
    keys = {cache_key(base)}
    for field, value in [("phase", "q"), ("template", "t@2"), ("oracle", "o2"), ("generation", {"max_new_tokens": 9}),
                         ("messages", [{"role": "user", "content": "x"}])]:
        keys.add(cache_key({**base, field: value}))
    assert len(keys) == 6


def test_recycler_caches_answered_rows_and_asks_again_only_for_rows_the_oracle_failed(tmp_path):
    from test_support.oracles import ScriptedOracle
    from reflect_trainer import Recycler, ReflectionConfig
    from reflect_trainer.oracles import Generation

    asked = []

    def script(conversation):
        text = conversation[-1]["content"] if conversation[-1]["role"] == "user" else conversation[-2]["content"]
        asked.append("FAILME" in text)
        if "FAILME" in text:
            return Generation("", "error", "oracle_error:500")
        return Generation("A better answer.\n[End]", "stop")

    rows = {"instruction": ["Say hi.", "FAILME please.", "Count to 3."], "input": [""] * 3,
            "output": ["hi", "no", "1 2 3"]}
    config = ReflectionConfig(cache_dir=str(tmp_path), mode="response", template_set="compact", progress_bar=False)
    first = Recycler(config, oracle=ScriptedOracle(script))
    first(rows)
    assert sorted(asked) == [False, False, True] and len(first.cache) == 2
    asked.clear()
    again = Recycler(config, oracle=ScriptedOracle(script))
    again(rows)
    assert asked == [True]  # the two answered rows came from the cache; the failed one was asked again
    assert again.stats()["cache_hits"] == 2 and len(again.cache) == 2
