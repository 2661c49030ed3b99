"""The cache's exactly-once protocol under real faults: dead owners whose pids were reused, simultaneous takers,
non-owners releasing, slow owners, forked/pickled/num_proc copies, a full disk, two hosts, NFS-style late data.

Real processes throughout; the generate function is scripted (fault injection) and logs every key it is asked for,
so the tests count generations from what the processes recorded. No timing thresholds: a hang fails the test
after a generous timeout.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from reflect_trainer.cache import RecycleCache, _decode, _encode, _pid_namespace, _proc_stat
from test_support.cache_files import stored_records
from test_support.cache_workload import command, counting_generate, expected_raw, generation_log

HANG = 120  # seconds after which a call that should have returned counts as hung
REPO = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def bounded(fn, timeout=HANG):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    result, error = [], []
    thread = threading.Thread(target=lambda: _capture(fn, result, error), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"hung for {timeout}s"
    if error:
        raise error[0]
    return result[0]


def _capture(fn, result, error):
    try:
        result.append(fn())
    except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
        error.append(err)


def workload(tmp_path, keys, name, **spec):
    calls = tmp_path / "calls"
    calls.mkdir(exist_ok=True)
    spec = {"dir": str(tmp_path / "cache"), "keys": keys, "calls": str(calls), "out": str(tmp_path / f"{name}.json"),
            **spec}
    return command(spec)  # run with ENV: the repository root on PYTHONPATH


def write_claim(cache_dir: Path, key: str, **owner) -> Path:
    """A claim as a (possibly long gone) owner left it."""
    path = cache_dir / "claims" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": os.uname().nodename, "nonce": uuid.uuid4().hex, **owner}))
    return path


def my_owner_fields() -> dict:
    from reflect_trainer.cache import _BOOT_ID

    return {"boot": _BOOT_ID, "pidns": _pid_namespace()}


# ---- defect 1: dead owners whose pids were reused; empty claims; bounded waits --------------------------------
def test_claim_whose_pid_now_names_an_unrelated_live_process_is_taken_over_at_once(tmp_path):
    # After a container restart the dead owner's pid belongs to some other live process. Its start time differs.
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        real_start = _proc_stat(unrelated.pid)[1]
        write_claim(tmp_path, "k", pid=unrelated.pid, start=real_start - 1000, **my_owner_fields())
        cache = RecycleCache(tmp_path, claim_lease_seconds=3600, max_wait_seconds=3600)
        fetched = bounded(lambda: cache.get_or_generate(["k"], counting_generate(tmp_path)))
    finally:
        unrelated.kill()
        unrelated.wait()
    assert fetched.taken_over == 1 and fetched.records["k"]["raw"] == expected_raw("k")
    assert generation_log(tmp_path) == {os.getpid(): ["k"]}


def test_claim_from_a_restarted_container_pid_namespace_is_taken_over_after_the_lease(tmp_path):
    # The new container has a new pid namespace: the old owner's pid cannot be checked, only its silent heartbeat.
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        write_claim(tmp_path, "k", pid=unrelated.pid, start=_proc_stat(unrelated.pid)[1],
                    boot=my_owner_fields()["boot"], pidns="pid:[1]")
        cache = RecycleCache(tmp_path, claim_lease_seconds=1.0, max_wait_seconds=3600)
        fetched = bounded(lambda: cache.get_or_generate(["k"], counting_generate(tmp_path)))
    finally:
        unrelated.kill()
        unrelated.wait()
    assert fetched.taken_over == 1 and fetched.waited == 1 and fetched.records["k"]["raw"] == expected_raw("k")


def test_empty_claim_left_by_a_kill_between_create_and_write_is_taken_over_without_waiting_for_the_lease(tmp_path):
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "k").touch()
    cache = RecycleCache(tmp_path, claim_lease_seconds=3600, max_wait_seconds=3600)
    fetched = bounded(lambda: cache.get_or_generate(["k"], counting_generate(tmp_path)))
    assert fetched.taken_over == 1 and fetched.records["k"]["raw"] == expected_raw("k")


def test_zombie_owner_is_dead(tmp_path):
    # kill -9 of a child its parent has not reaped yet: the pid still exists, as a zombie.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        write_claim(tmp_path, "k", pid=child.pid, start=_proc_stat(child.pid)[1], **my_owner_fields())
        os.kill(child.pid, signal.SIGKILL)
        while _proc_stat(child.pid)[0] != "Z":
            time.sleep(0.01)
        assert RecycleCache(tmp_path, claim_lease_seconds=3600).try_claim("k")
    finally:
        child.wait()


# ---- defect 4: claims are leases ----------------------------------------------------------------------------
def _race_for_claim(cache_dir, barrier, done, wins, delay):
    cache = RecycleCache(cache_dir, claim_lease_seconds=3600)
    judge = cache._judge

    def slow_judge(*args):  # a slow round trip (NFS) between judging the claim stale and removing it
        verdict = judge(*args)
        time.sleep(delay)
        return verdict

    cache._judge = slow_judge
    barrier.wait()
    won = cache.try_claim("k")
    with wins.get_lock():
        wins.value += won
    done.wait()  # stay alive (and heartbeat-free) until every taker judged: a dead winner's claim is fair game


def test_simultaneous_takers_of_a_stale_claim_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone
    for _ in range(15):
        write_claim(tmp_path, "k", pid=dead.pid, start=1, **my_owner_fields())
        barrier, done, wins = ctx.Barrier(4), ctx.Barrier(5), ctx.Value("i", 0)
        procs = [ctx.Process(target=_race_for_claim, args=(tmp_path, barrier, done, wins, delay))
                 for delay in (0, 0.01, 0.03, 0.06)]
        for p in procs:
            p.start()
        bounded(done.wait)
        for p in procs:
            p.join(HANG)
        assert wins.value == 1
        (tmp_path / "claims" / "k").unlink()
    assert not [p for p in (tmp_path / "claims").iterdir()]  # no private rename/link leftovers


def test_release_by_a_non_owner_or_a_former_owner_leaves_the_current_claim(tmp_path):
    owner, stranger = RecycleCache(tmp_path, claim_lease_seconds=60), RecycleCache(tmp_path)
    owner._owner["pidns"] = "pid:[1]"  # as if on another host: its claim is judged by its heartbeat alone
    assert owner.try_claim("k")
    claim = (tmp_path / "claims" / "k").read_bytes()
    stranger.release("k")
    assert (tmp_path / "claims" / "k").read_bytes() == claim
    # The owner stalls past its lease (no heartbeat); a new owner takes over; the old owner's late release must
    # not free the new owner's claim.
    os.utime(tmp_path / "claims" / "k", (0, 0))
    new_owner = RecycleCache(tmp_path, claim_lease_seconds=60)
    assert new_owner.try_claim("k")
    taken = (tmp_path / "claims" / "k").read_bytes()
    assert taken != claim
    owner.release("k")
    assert (tmp_path / "claims" / "k").read_bytes() == taken
    new_owner.release("k")
    assert not list((tmp_path / "claims").iterdir())


def test_heartbeat_keeps_a_slow_owners_claim_past_the_lease(tmp_path):
    marker = tmp_path / "owner-is-generating"
    owner = subprocess.Popen(workload(tmp_path, ["k"], "owner", lease=0.5, sleep=3.0, marker=str(marker)), env=ENV)
    try:
        deadline = time.time() + HANG
        while not marker.exists():
            assert owner.poll() is None and time.time() < deadline
            time.sleep(0.01)
        waiter = RecycleCache(tmp_path / "cache", claim_lease_seconds=0.5, max_wait_seconds=3600)
        fetched = bounded(lambda: waiter.get_or_generate(["k"], counting_generate(tmp_path / "calls")))
        assert owner.wait(HANG) == 0
    finally:
        owner.kill()
    # The owner's call lasted six leases; the waiter waited for it instead of taking over.
    assert fetched.waited == 1 and fetched.taken_over == 0 and fetched.generated == 0
    assert generation_log(tmp_path / "calls") == {owner.pid: ["k"]}
    assert [r["key"] for r in stored_records(tmp_path / "cache")] == ["k"]


def test_owner_that_lost_its_lease_keeps_the_new_owners_record_and_stores_no_second_copy(tmp_path):
    # A stalls (no heartbeat for longer than the lease) mid-call; B takes the key over, generates and stores it.
    # When A's call returns, the key is stored once and A serves B's record: at least once, deduplicated.
    a = RecycleCache(tmp_path, claim_lease_seconds=3600)  # its heartbeat would come only after an hour
    a._owner["pidns"] = "pid:[1]"  # as if on another host: judged by its heartbeat alone
    b = RecycleCache(tmp_path, claim_lease_seconds=0.5)
    a_generating, b_done = threading.Event(), threading.Event()

    def slow_a(keys):
        a_generating.set()
        assert b_done.wait(HANG)
        return [{"key": k, "raw": "A's"} for k in keys], {}

    thread = threading.Thread(target=lambda: result.append(a.get_or_generate(["k"], slow_a)), daemon=True)
    result = []
    thread.start()
    assert a_generating.wait(HANG)
    fetched_b = bounded(lambda: b.get_or_generate(["k"], lambda keys: ([{"key": k, "raw": "B's"} for k in keys], {})))
    b_done.set()
    thread.join(HANG)
    assert fetched_b.taken_over == 1 and fetched_b.records["k"]["raw"] == "B's"
    assert result[0].records["k"]["raw"] == "B's"
    assert [(r["key"], r["raw"]) for r in stored_records(tmp_path)] == [("k", "B's")]
    assert not list((tmp_path / "claims").iterdir())  # A's late release left nothing behind and freed nothing of B's


def test_generate_error_gives_the_claims_back_at_once(tmp_path):
    cache = RecycleCache(tmp_path, claim_lease_seconds=3600)

    def broken(keys):
        raise ConnectionError("oracle unreachable")

    try:
        cache.get_or_generate(["a", "b"], broken)
        raise AssertionError("the error was swallowed")
    except ConnectionError:
        pass
    assert not list((tmp_path / "claims").iterdir())
    other = RecycleCache(tmp_path, claim_lease_seconds=3600)
    fetched = bounded(lambda: other.get_or_generate(["a", "b"], counting_generate(tmp_path, sleep=0)))
    assert fetched.generated == 2 and fetched.taken_over == 0


# ---- defect 2: forked, pickled and num_proc copies are separate writers ----------------------------------------
def test_forked_copy_is_a_separate_writer_and_each_key_is_generated_once(tmp_path):
    keys = [f"k{i}" for i in range(24)]
    cache = RecycleCache(tmp_path / "cache", claim_lease_seconds=5)
    generate = counting_generate(tmp_path, sleep=0.02)
    cache.get_or_generate(keys[:2], generate)  # the parent has an open segment before forking
    pid = os.fork()
    if pid == 0:  # the child works through the keys backwards, the parent forwards: they meet in the middle
        code = 1
        try:
            for i in range(len(keys), 0, -3):
                cache.get_or_generate(keys[max(0, i - 3) : i], generate)
            code = 0
        finally:
            os._exit(code)
    for i in range(0, len(keys), 3):
        cache.get_or_generate(keys[i : i + 3], generate)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log = generation_log(tmp_path)
    assert set(log) == {os.getpid(), pid}
    assert Counter(k for ks in log.values() for k in ks) == Counter(keys)  # each key generated exactly once
    assert len(list((tmp_path / "cache" / "segments").glob("*.jsonl"))) == 2  # one segment per process
    reopened = RecycleCache(tmp_path / "cache")
    assert len(reopened) == len(keys) and reopened.duplicates_seen == 0
    assert all(reopened.get(k)["raw"] == expected_raw(k) for k in keys)


def test_pickled_copy_is_a_separate_writer_that_waits_for_the_original(tmp_path):
    cache = RecycleCache(tmp_path, claim_lease_seconds=3600)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.writer_id != cache.writer_id
    assert cache.try_claim("k") and not copy.try_claim("k")  # same pid, but a live claim of another writer
    copy.put_many([{"key": "c", "raw": "from the copy"}])
    cache.put_many([{"key": "o", "raw": "from the original"}])
    cache.refresh()
    copy.refresh()
    assert cache.get("c")["raw"] == "from the copy" and copy.get("o")["raw"] == "from the original"


class _MapRecycler:
    """A recycler-like batched ``datasets`` transform: keys in, records (cached or generated) out."""

    def __init__(self, cache_dir, calls_dir):
        self.cache = RecycleCache(cache_dir, claim_lease_seconds=5)
        self.generate = counting_generate(calls_dir, sleep=0.02)

    def __call__(self, batch):
        fetched = self.cache.get_or_generate(batch["key"], self.generate)
        return {"raw": [fetched.records[k]["raw"] for k in batch["key"]]}


def test_datasets_map_with_num_proc_2_generates_each_key_once(tmp_path):
    from datasets import Dataset

    keys = [f"k{i}" for i in range(16)]
    transform = _MapRecycler(tmp_path / "cache", tmp_path / "calls")
    (tmp_path / "calls").mkdir()
    # Both shards hold every key (in opposite orders): the two worker processes contend for all of them.
    ds = Dataset.from_dict({"key": keys + keys[::-1]})
    out = bounded(lambda: ds.map(transform, batched=True, batch_size=4, num_proc=2,
                                 cache_file_name=str(tmp_path / "map.arrow")))
    assert out["raw"] == [expected_raw(k) for k in keys + keys[::-1]]
    log = generation_log(tmp_path / "calls")
    assert Counter(k for ks in log.values() for k in ks) == Counter(keys)
    assert sorted(r["key"] for r in stored_records(tmp_path / "cache")) == sorted(keys)
    assert len(list((tmp_path / "cache" / "segments").glob("*.jsonl"))) == len(log) == 2  # a segment per worker


# ---- defect 10 (part): disk full mid-batch --------------------------------------------------------------------
DISK_FULL = """
import resource, signal, sys
from reflect_trainer.cache import RecycleCache, CacheWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
cache = RecycleCache(sys.argv[1])
cache.put_many([{"key": f"before{i}", "raw": "x" * 100} for i in range(3)])
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # the disk fills up mid-batch
try:
    cache.put_many([{"key": f"lost{i}", "raw": "y" * 150} for i in range(8)])
except CacheWriteError as err:
    print("ERROR:", err)
assert not any(f"lost{i}" in cache for i in range(8))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # space returns
cache.put_many([{"key": "after", "raw": "z"}])
"""


def test_disk_full_mid_batch_raises_a_clear_error_and_leaves_no_fragment(tmp_path):
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True, env=ENV,
                          timeout=HANG)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: " in proc.stdout and "could not store 8 cache records" in proc.stdout
    assert "disk full" in proc.stdout
    reopened = RecycleCache(tmp_path)
    assert sorted(reopened.keys()) == ["after", "before0", "before1", "before2"]
    assert reopened.duplicates_seen == 0
    lines = [ln for seg in (tmp_path / "segments").glob("*.jsonl") for ln in seg.read_bytes().splitlines(True)]
    assert len(lines) == 4 and all(_decode(ln) is not None for ln in lines)  # no torn or merged fragment


# ---- defect 5: NFS visibility --------------------------------------------------------------------------------
def test_reader_does_not_step_past_bytes_that_have_not_arrived(tmp_path):
    (tmp_path / "segments").mkdir(parents=True)
    segment = tmp_path / "segments" / "otherhost-1-abc.jsonl"
    late = _encode({"key": "late", "raw": "written by another client, not here yet"})
    segment.write_bytes(_encode({"key": "a", "raw": "1"}) + b"\0" * len(late)  # its newline not there either
                        + _encode({"key": "b", "raw": "2"}) + _encode({"key": "c", "raw": "3"}))
    reader = RecycleCache(tmp_path)
    # "b" runs into the missing region (one line as far as the reader can tell); "c" is whole.
    assert "a" in reader and "c" in reader and "late" not in reader and "b" not in reader
    with open(segment, "r+b") as f:  # the region's data arrives
        f.seek(len(_encode({"key": "a", "raw": "1"})))
        f.write(late)
    reader.refresh()
    assert reader.get("late")["raw"].startswith("written by another client")
    assert reader.get("b")["raw"] == "2"
    assert reader.duplicates_seen == 0 and len(reader) == 4


def test_waiter_finds_the_record_although_its_directory_listing_is_stale(tmp_path):
    owner = RecycleCache(tmp_path, claim_lease_seconds=3600)
    waiter = RecycleCache(tmp_path, claim_lease_seconds=3600)
    waiter._segment_names = lambda: []  # NFS directory cache: the owner's new segment is not listed yet
    assert owner.try_claim("k")
    saw_claim, read_claim = threading.Event(), waiter._read_claim

    def spied_read_claim(key):
        claim = read_claim(key)
        if claim is not None:
            saw_claim.set()
        return claim

    waiter._read_claim = spied_read_claim
    waiter_generated = []
    thread_result = []
    thread = threading.Thread(target=lambda: thread_result.append(
        waiter.get_or_generate(["k"], lambda ks: (waiter_generated.extend(ks) or [], {}))), daemon=True)
    thread.start()
    assert saw_claim.wait(HANG)  # the waiter is waiting on the owner's claim (which names the owner's segment)
    owner.put_many([{"key": "k", "raw": "the owner's"}])
    owner.release("k")
    thread.join(HANG)
    assert not thread.is_alive()
    assert waiter_generated == [] and thread_result[0].records["k"]["raw"] == "the owner's"


# ---- two hosts, and kill -9 -------------------------------------------------------------------------------------
def test_two_hosts_sharing_one_cache_dir_generate_each_key_once(tmp_path):
    # Two hostnames and two pid namespaces on one machine: neither can check the other's pids, only heartbeats.
    keys = [f"k{i}" for i in range(20)]
    procs = []
    for host, order in (("hostA", keys), ("hostB", keys[::-1])):
        cmd = workload(tmp_path, order, host, lease=1.0, sleep=0.05, batch=3)
        procs.append(subprocess.Popen(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
                                       f'hostname {host} && exec "$@"', "sh", *cmd], env=ENV))
    for p in procs:
        assert p.wait(HANG) == 0
    log = generation_log(tmp_path / "calls")
    assert Counter(k for ks in log.values() for k in ks) == Counter(keys)
    for host in ("hostA", "hostB"):
        result = json.loads((tmp_path / f"{host}.json").read_text())
        assert result["writer"].startswith(host + "-")
        assert result["got"] == {k: expected_raw(k) for k in keys}
    assert sorted(r["key"] for r in stored_records(tmp_path / "cache")) == sorted(keys)


def test_kill_9_mid_workload_then_resume_loses_nothing_and_stores_nothing_twice(tmp_path):
    keys = [f"k{i}" for i in range(30)]
    victims = [subprocess.Popen(workload(tmp_path, order, f"v{i}", sleep=0.05, batch=3), env=ENV)
               for i, order in enumerate((keys, keys[::-1]))]
    calls = tmp_path / "calls"
    deadline = time.time() + HANG
    while sum(len(ks) for ks in generation_log(calls).values()) < 8:
        assert time.time() < deadline
        time.sleep(0.01)
    for v in victims:
        v.send_signal(signal.SIGKILL)
        v.wait()
    resumed = subprocess.run(workload(tmp_path, keys, "resumed", batch=5), env=ENV, timeout=HANG)
    assert resumed.returncode == 0
    assert json.loads((tmp_path / "resumed.json").read_text())["got"] == {k: expected_raw(k) for k in keys}
    stored = [r["key"] for r in stored_records(tmp_path / "cache")]
    assert sorted(stored) == sorted(keys)  # none lost, none stored twice
