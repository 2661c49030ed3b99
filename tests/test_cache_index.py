"""The cache at scale: persisted indexes (never trusted over the data), one winner for a duplicated key,
compaction and cleanup, a small pickled state, and the protocol's clocks (per-key max_wait, no wall clock)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from reflect_trainer import cache as cache_module
from reflect_trainer.cache import RecycleCache, _encode
from reflect_trainer.cache_index import _ENTRY, _HEADER_BYTES, _entries

REPO = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def records(n: int, prefix: str = "k", size: int = 40) -> list[dict]:
    return [{"key": f"{prefix}{i}", "raw": f"answer {prefix}{i} " + "é" * size} for i in range(n)]


def segment_and_index(cache_dir: Path) -> tuple[Path, Path]:
    (segment,) = (cache_dir / "segments").glob("*.jsonl")
    return segment, cache_dir / "index" / (segment.stem + ".idx")


def entries_of(index: Path) -> np.ndarray:
    data = index.read_bytes()[_HEADER_BYTES:]
    return np.frombuffer(data[: len(data) // 32 * 32], dtype=_ENTRY).copy()


def write_entries(index: Path, e: np.ndarray) -> None:
    head = index.read_bytes()[:_HEADER_BYTES]
    index.write_bytes(head + _entries(e["digest"], e["offset"], e["length"], e["crc"]))


def data_scans(monkeypatch) -> list[int]:
    """Bytes each reader read by scanning segment data (not through the index)."""
    scanned, real = [], RecycleCache._scan

    def spy(self, seg, name, fd, size):
        scanned.append(size - seg.data_end)
        return real(self, seg, name, fd, size)

    monkeypatch.setattr(RecycleCache, "_scan", spy)
    return scanned


def run_writer(cache_dir: Path, code: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, **({"REFLECT_CACHE_FAILPOINT": failpoint} if failpoint else {})}
    script = f"from reflect_trainer.cache import RecycleCache\ncache = RecycleCache({str(cache_dir)!r})\n{code}"
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


# ---- the index: used, and never trusted over the data --------------------------------------------------------
def test_reopening_reads_the_index_and_not_the_data(tmp_path, monkeypatch):
    writer = RecycleCache(tmp_path)
    writer.put_many(records(300))
    writer.put_many(records(200, prefix="second"))
    scanned = data_scans(monkeypatch)
    reader = RecycleCache(tmp_path)
    assert len(reader) == 500 and sum(scanned) == 0
    assert reader.get("k17")["raw"] == records(300)[17]["raw"] and reader.get("second199") is not None
    assert reader.get("absent") is None and "absent" not in reader


def test_an_index_entry_pointing_at_another_record_never_returns_the_wrong_record(tmp_path):
    RecycleCache(tmp_path).put_many(records(3))
    _, index = segment_and_index(tmp_path)
    e = entries_of(index)
    e["digest"][0], e["digest"][2] = e["digest"][2], e["digest"][0]  # k0 "is" at k2's line and k2 at k0's
    write_entries(index, e)  # well-formed entries (checks recomputed, offsets in order) that lie
    reader = RecycleCache(tmp_path)
    assert reader.get("k0") == records(3)[0]  # the right record, found by reading the segment's data
    assert reader.get("k2") == records(3)[2] and reader.get("k1") == records(3)[1]
    assert reader.index_mismatches == 1


def test_a_zeroed_index_region_and_a_torn_entry_cost_a_scan_not_a_record(tmp_path):
    RecycleCache(tmp_path).put_many(records(50))
    _, index = segment_and_index(tmp_path)
    data = bytearray(index.read_bytes())
    data[_HEADER_BYTES + 10 * 32 : _HEADER_BYTES + 20 * 32] = bytes(10 * 32)  # a zeroed region (power loss)
    index.write_bytes(bytes(data) + b"\x01" * 13)  # and a torn last entry
    reader = RecycleCache(tmp_path)
    assert len(reader) == 50 and all(reader.get(r["key"]) == r for r in records(50))


def test_an_index_entry_with_a_flipped_bit_fails_its_check_and_its_record_is_still_found(tmp_path):
    RecycleCache(tmp_path).put_many(records(10))
    _, index = segment_and_index(tmp_path)
    data = bytearray(index.read_bytes())
    data[_HEADER_BYTES + 4 * 32] ^= 0x10  # bit rot in entry 4's key digest: offsets still follow on, the check fails
    index.write_bytes(bytes(data))
    reader = RecycleCache(tmp_path)
    assert all(reader.get(r["key"]) == r for r in records(10)) and len(reader) == 10


def test_an_index_entry_past_the_end_of_its_segment_is_not_used(tmp_path):
    RecycleCache(tmp_path).put_many(records(5))
    segment, index = segment_and_index(tmp_path)
    size = segment.stat().st_size
    e = entries_of(index)
    extra = e[-1:].copy()
    extra["offset"], extra["length"] = size, 1000  # data that never arrived (or a stale segment)
    write_entries(index, np.concatenate([e, extra]))
    reader = RecycleCache(tmp_path)
    assert len(reader) == 5 and all(reader.get(r["key"]) == r for r in records(5))
    with open(segment, "ab") as f:  # the segment grows past that entry with a different record
        f.write(_encode({"key": "later", "raw": "appended"}))
    reader.refresh()
    assert reader.get("later")["raw"] == "appended" and len(reader) == 6


def test_a_stale_index_is_completed_from_the_data(tmp_path):
    RecycleCache(tmp_path).put_many(records(5))
    segment, index = segment_and_index(tmp_path)
    with open(segment, "ab") as f:  # records fsynced, then a kill -9 before their index entries were written
        f.write(b"".join(_encode(r) for r in records(3, prefix="unindexed")))
    reader = RecycleCache(tmp_path)
    assert len(reader) == 8 and reader.get("unindexed2") == records(3, prefix="unindexed")[2]


@pytest.mark.parametrize("failpoint", ["after_data_fsync", "mid_index_entry"])
def test_kill_9_between_the_data_and_its_index_loses_nothing_fsynced(tmp_path, failpoint):
    code = ("cache.put_many([{'key': 'first', 'raw': 'one'}])\n"
            "import os; os.environ['REFLECT_CACHE_FAILPOINT'] = " + repr(failpoint) + "\n"
            "cache.put_many([{'key': 'second', 'raw': 'two'}])\nprint('not killed')")
    proc = run_writer(tmp_path, code)
    assert proc.returncode == -9 and "not killed" not in proc.stdout
    reader = RecycleCache(tmp_path)
    assert reader.get("first")["raw"] == "one" and reader.get("second")["raw"] == "two"  # fsynced before the kill
    reader.put_many([{"key": "third", "raw": "three"}])
    assert len(RecycleCache(tmp_path)) == 3


def test_disk_full_while_writing_the_index_keeps_the_records(tmp_path):
    code = ("cache.put_many([{'key': 'first', 'raw': 'one'}])\n"
            "import os; os.environ['REFLECT_CACHE_FAILPOINT'] = 'enospc:index_write'\n"
            "cache.put_many([{'key': 'second', 'raw': 'two'}])\n"
            "cache.put_many([{'key': 'third', 'raw': 'three'}])\nprint('stored')")
    proc = run_writer(tmp_path, code)
    assert proc.returncode == 0 and "stored" in proc.stdout, proc.stderr
    assert "could not write the index" in proc.stderr
    reader = RecycleCache(tmp_path)
    assert [reader.get(k)["raw"] for k in ("first", "second", "third")] == ["one", "two", "three"]


def test_a_cache_written_before_indexes_existed_opens_identically_and_gets_its_index_once(tmp_path, monkeypatch):
    (tmp_path / "segments").mkdir()
    old = records(40)
    (tmp_path / "segments" / "oldhost-12-abcd1234.jsonl").write_bytes(b"".join(_encode(r) for r in old))
    first = RecycleCache(tmp_path)
    assert sorted(first.records(), key=lambda r: r["key"]) == sorted(old, key=lambda r: r["key"])
    assert (tmp_path / "index" / "oldhost-12-abcd1234.idx").exists()  # built by that first reader
    scanned = data_scans(monkeypatch)
    second = RecycleCache(tmp_path)
    assert sum(scanned) == 0 and all(second.get(r["key"]) == r for r in old)


def test_a_kill_before_a_built_index_is_linked_leaves_the_cache_readable(tmp_path):
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "oldhost-1-ffff0000.jsonl").write_bytes(b"".join(_encode(r) for r in records(10)))
    proc = run_writer(tmp_path, "print('not killed')", failpoint="before_index_link")
    assert proc.returncode == -9
    assert not (tmp_path / "index" / "oldhost-1-ffff0000.idx").exists()
    reader = RecycleCache(tmp_path)
    assert len(reader) == 10 and all(reader.get(r["key"]) == r for r in records(10))


# ---- one winner for a duplicated key ----------------------------------------------------------------------------
def test_readers_that_open_segments_in_opposite_orders_serve_the_same_copy_of_a_duplicated_key(tmp_path):
    (tmp_path / "segments").mkdir()
    copies = [{"key": "dup", "raw": f"copy {i}"} for i in range(4)]
    for i, record in enumerate(copies):  # four writers stored the key at the same moment (a lost lease)
        (tmp_path / "segments" / f"host-{i}-0000000{i}.jsonl").write_bytes(_encode(record))
    names = sorted(os.listdir(tmp_path / "segments"))
    readers = []
    for order in (names, names[::-1]):  # one reader finds the copies one by one forwards, the other backwards
        visible = [order[0]]
        reader = RecycleCache.__new__(RecycleCache)
        reader._segment_names = lambda visible=visible: list(visible)
        RecycleCache.__init__(reader, tmp_path)
        assert reader.get("dup") == copies[names.index(order[0])]  # the only copy it can see yet
        for name in order[1:]:
            visible.append(name)
            reader.refresh()
        readers.append(reader)
    forward, backward = readers
    served = forward.get("dup")
    assert served == backward.get("dup") and served in copies
    assert forward.duplicates_seen == backward.duplicates_seen == 3


# ---- compaction and cleanup -------------------------------------------------------------------------------------
def test_fifty_restarts_leave_a_bounded_number_of_segments_and_every_record(tmp_path):
    expected = {}
    for run in range(50):  # each run: a process that stores a few records and ends (its segment is sealed)
        cache = RecycleCache(tmp_path, compact_after_segments=8)
        batch = records(3, prefix=f"run{run}-")
        cache.put_many(batch)
        expected.update({r["key"]: r for r in batch})
        cache.close()
    segments = list((tmp_path / "segments").glob("*.jsonl"))
    indexes = list((tmp_path / "index").glob("*.idx"))
    assert len(segments) <= 9 and len(indexes) == len(segments)
    reader = RecycleCache(tmp_path)
    assert len(reader) == 150 and reader.duplicates_seen == 0
    assert all(reader.get(k) == r for k, r in expected.items())


def test_compaction_keeps_the_winner_of_a_duplicated_key(tmp_path):
    for i in range(3):
        cache = RecycleCache(tmp_path)
        cache.put_many([{"key": "dup", "raw": f"copy {i}"}, {"key": f"own{i}", "raw": str(i)}])
        cache.close()
    served = RecycleCache(tmp_path).get("dup")
    merger = RecycleCache(tmp_path)
    assert merger.compact() == 3
    assert len(list((tmp_path / "segments").glob("*.jsonl"))) == 1
    after = RecycleCache(tmp_path)
    assert after.get("dup") == served and after.duplicates_seen == 0 and len(after) == 4


def test_a_segment_whose_writer_is_alive_and_unsealed_is_not_merged(tmp_path):
    live = RecycleCache(tmp_path)
    live.put_many([{"key": "live", "raw": "still writing"}])
    for i in range(3):
        done = RecycleCache(tmp_path)
        done.put_many([{"key": f"done{i}", "raw": str(i)}])
        done.close()
    assert RecycleCache(tmp_path).compact() == 3
    live.put_many([{"key": "live2", "raw": "appended after the merge"}])
    assert (tmp_path / "segments" / f"{live.writer_id}.jsonl").exists()
    reader = RecycleCache(tmp_path)
    assert reader.get("live2")["raw"] == "appended after the merge" and len(reader) == 5


@pytest.mark.parametrize("failpoint", ["mid_merge", "before_index_link"])
def test_kill_9_during_a_merge_loses_nothing_and_the_next_merge_finishes(tmp_path, failpoint):
    expected = []
    for i in range(4):
        cache = RecycleCache(tmp_path)
        batch = records(5, prefix=f"s{i}-")
        cache.put_many(batch)
        expected += batch
        cache.close()
    proc = run_writer(tmp_path, "cache.compact()\nprint('not killed')", failpoint=failpoint)
    assert proc.returncode == -9
    reader = RecycleCache(tmp_path, cleanup_grace_seconds=0, claim_lease_seconds=0.1)
    assert len(reader) == 20 and all(reader.get(r["key"]) == r for r in expected)
    time.sleep(0.2)  # the dead merger's claim is taken over (its pid is gone), its temp files are old enough
    assert reader.compact() == 4
    assert len(list((tmp_path / "segments").glob("*.jsonl"))) == 1
    final = RecycleCache(tmp_path, cleanup_grace_seconds=0)
    assert [p.name for p in (tmp_path / "segments").iterdir() if p.name.startswith(".")] == []
    assert len(final) == 20 and all(final.get(r["key"]) == r for r in expected)


def test_cleanup_removes_old_leftovers_by_the_file_servers_clock_and_keeps_fresh_ones(tmp_path):
    RecycleCache(tmp_path).put_many(records(2))
    old_temp = tmp_path / "claims" / ".k.deadbeef.new"
    fresh_temp = tmp_path / "claims" / ".k.cafebabe.new"
    orphan = tmp_path / "index" / "gone-1-00000000.idx"
    old_claim = tmp_path / "claims" / "nobody-wants-this-key"
    for path in (old_temp, fresh_temp, orphan, old_claim):
        path.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    two_hours_ago = time.time() - 7200
    for path in (old_temp, orphan, old_claim):
        os.utime(path, (two_hours_ago, two_hours_ago))
    RecycleCache(tmp_path, cleanup_grace_seconds=3600)
    assert not old_temp.exists() and not orphan.exists() and not old_claim.exists()
    assert fresh_temp.exists()


def test_pickled_state_is_small_and_the_copy_reads_everything(tmp_path):
    cache = RecycleCache(tmp_path)
    cache.put_many(records(2000))
    blob = pickle.dumps(cache)
    assert len(blob) <= 10_000
    copy = pickle.loads(blob)
    assert len(copy) == 2000 and copy.get("k1999") == records(2000)[1999]


# ---- the protocol's clocks ---------------------------------------------------------------------------------------
def as_other_host(cache: RecycleCache) -> RecycleCache:
    cache._owner.update(host="other-node", boot="another-boot-id", pidns="pid:[1]")  # pid cannot be checked
    return cache


@pytest.mark.parametrize("skew", [-150, 150])
def test_a_waiter_whose_clock_is_150s_off_the_owners_takes_over_no_live_claim(tmp_path, skew):
    owner = as_other_host(RecycleCache(tmp_path, claim_lease_seconds=60))
    assert owner.try_claim("k")
    claim = tmp_path / "claims" / "k"
    waiter = RecycleCache(tmp_path, claim_lease_seconds=60, max_wait_seconds=3600)
    for beat in range(3):  # the owner's heartbeats, stamped by a clock 150 s away from the waiter's
        stamp = time.time() + skew + beat
        os.utime(claim, (stamp, stamp))
        assert not waiter.try_claim("k")
        time.sleep(0.05)
    real_time = time.time
    cache_module.time.time = lambda: real_time() - skew  # and the waiter's own wall clock off the other way
    try:
        assert not waiter.try_claim("k")
    finally:
        cache_module.time.time = real_time
    assert json.loads(claim.read_bytes())["writer"] == owner.writer_id


def test_a_call_that_runs_longer_than_max_wait_takes_over_no_fresh_claim(tmp_path):
    waiter = RecycleCache(tmp_path, claim_lease_seconds=3600, max_wait_seconds=1.0)
    first_owner = as_other_host(RecycleCache(tmp_path, claim_lease_seconds=3600))
    second_owner = as_other_host(RecycleCache(tmp_path, claim_lease_seconds=3600))
    assert first_owner.try_claim("b")

    def hand_over():  # while the waiter generates "a": "b" changes hands (the first owner's row failed)
        time.sleep(1.2)
        first_owner.release("b")
        assert second_owner.try_claim("b")
        time.sleep(1.0)  # the second owner works for a second, well within its lease
        second_owner.put_many([{"key": "b", "raw": "second owner's"}])
        second_owner.release("b")

    thread = threading.Thread(target=hand_over, daemon=True)
    thread.start()

    def generate(keys):
        time.sleep(1.5)  # this call is now older than max_wait_seconds
        return [{"key": k, "raw": "waiter's"} for k in keys], {}

    fetched = waiter.get_or_generate(["a", "b"], generate)
    thread.join(10)
    assert fetched.taken_over == 0 and fetched.records["b"]["raw"] == "second owner's"
    assert fetched.records["a"]["raw"] == "waiter's"


def test_recycling_stats_report_the_caches_duplicates_and_lost_leases(tmp_path):
    from reflect_trainer import Recycler, ReflectionConfig

    (tmp_path / "segments").mkdir()
    for i in range(2):  # two writers stored different records of one key (a live owner that lost its lease)
        (tmp_path / "segments" / f"h-{i}-0000000{i}.jsonl").write_bytes(_encode({"key": "dup", "raw": f"copy {i}"}))
    recycler = Recycler(ReflectionConfig(cache_dir=str(tmp_path), oracle_model_path="embedded:smollm2"))
    assert recycler.cache.try_claim("k")
    (tmp_path / "claims" / "k").unlink()  # another writer took the key over (its owner looked dead or silent)...
    assert RecycleCache(tmp_path).try_claim("k")
    recycler.cache._renew_claims()  # ...which this writer's next heartbeat notices
    stats = recycler.stats()
    assert stats["cache_duplicates_seen"] == 1 and stats["cache_leases_lost"] == 1
