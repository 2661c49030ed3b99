"""B12: the cache at paper scale and beyond: open time, memory, look-ups, refresh, pickled size, disk.

Writes N records with 8 writer processes (``RecycleCache.put_many``, batches of 64), then measures each side in a
fresh process (so RSS is that process's alone):

* ``indexed``: this version (records stay on disk; persisted indexes; 28 bytes a record in memory);
* ``anchor``: the cache as it was before this change (commit 068b638, loaded from git): it parses every record
  at open and keeps them all in a dict. Same files, same machine, same run; interleaved with the other side.

Reported per side: open time, RSS growth over import (current VmRSS, and the peak VmHWM), ``get`` p50/p99 over 64
random keys, ``refresh`` with nothing new, pickled size. Once per run: ``refresh`` over 200 unchanged segments, disk
size. Goals (issue 20): 156k records of ~4 KB: open <= 0.3 s, RSS growth <= 60 MB; 1.5M small records: open <= 1 s,
RSS growth <= 200 MB; get p99 <= 2 ms; refresh with nothing new <= 50 ms; pickled <= 10 KB.

    .venv/bin/python benchmarks/b12_cache_scale.py --records 156000 --size 4000
    .venv/bin/python benchmarks/b12_cache_scale.py --records 1500000 --size 100 --no-anchor   # once, not in CI
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import multiprocessing
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANCHOR_COMMIT = "068b638"  # the last commit before the indexed cache
WRITERS = 8


def key_of(writer: int, i: int) -> str:
    from reflect_trainer.cache import cache_key

    return cache_key({"writer": writer, "i": i})


def write_share(directory: str, writer: int, n: int, size: int, batch: int) -> None:
    from reflect_trainer.cache import RecycleCache

    cache = RecycleCache(directory, compact_after_segments=10**9)
    rng = random.Random(writer)
    for start in range(0, n, batch):
        cache.put_many([{"key": key_of(writer, i), "raw": base64.b64encode(rng.randbytes(size * 3 // 4)).decode(),
                         "finish": "stop"} for i in range(start, min(n, start + batch))])
    cache.close()


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(side: str, directory: str, n: int, anchor_path: str | None) -> dict:
    """One side, in this (fresh) process."""
    before_import = rss_mb()[0]
    if side == "anchor":
        spec = importlib.util.spec_from_file_location("anchor_cache", anchor_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["anchor_cache"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        RecycleCache = module.RecycleCache
    else:
        import numpy  # noqa: F401 - the package imports it anyway (torch, datasets); not the cache's cost

        from reflect_trainer.cache import RecycleCache
    after_import = rss_mb()[0]
    started = time.perf_counter()
    cache = RecycleCache(directory)
    opened = time.perf_counter() - started
    rss, peak = rss_mb()
    assert len(cache) == n, (len(cache), n)
    rng = random.Random(1)
    keys = [key_of(rng.randrange(WRITERS), rng.randrange(n // WRITERS)) for _ in range(64)]
    for k in keys[:8]:
        cache.get(k)  # warm the descriptors
    gets = []
    for k in keys:
        t = time.perf_counter()
        record = cache.get(k)
        gets.append((time.perf_counter() - t) * 1000)
        assert record is not None and record["key"] == k
    refreshes = []
    for _ in range(20):
        t = time.perf_counter()
        cache.refresh()
        refreshes.append((time.perf_counter() - t) * 1000)
    gets.sort()
    return {"side": side, "seconds": opened, "import_mb": after_import - before_import,
            "rss_growth_mb": rss - after_import, "peak_growth_mb": peak - after_import,
            "get_p50_ms": gets[len(gets) // 2], "get_p99_ms": gets[int(len(gets) * 0.99) - 1],
            "refresh_ms": statistics.median(refreshes), "pickled_bytes": len(pickle.dumps(cache))}


def run_side(side: str, directory: str, n: int, anchor_path: str | None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", side, "--dir", directory, "--records", str(n),
                          "--anchor-path", anchor_path or ""], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def refresh_over_unchanged_segments(root: Path, segments: int = 200) -> float:
    """Median ms of a refresh when ``segments`` segments exist and none changed."""
    from reflect_trainer.cache import RecycleCache

    directory = root / "many"
    for i in range(segments):
        writer = RecycleCache(directory, compact_after_segments=10**9)
        writer.put_many([{"key": f"k{i}", "raw": "x" * 100}])
        writer.close()
    reader = RecycleCache(directory, compact_after_segments=10**9)
    assert len(list((directory / "segments").iterdir())) == segments and len(reader) == segments
    samples = []
    for _ in range(30):
        t = time.perf_counter()
        reader.refresh()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def describe(values, fmt=".3f") -> str:
    mid = statistics.median(values)
    spread = (max(values) - min(values)) / mid if mid else 0.0
    return f"{format(mid, fmt)} (spread {spread:.0%}, n={len(values)}: {' '.join(format(v, fmt) for v in values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=156_000)
    parser.add_argument("--size", type=int, default=4000, help="characters of oracle text per record")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-anchor", action="store_true", help="skip the old cache (it needs ~6 KB RAM a record)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--anchor-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.records, args.anchor_path or None)))
        return 0
    n = args.records - args.records % WRITERS
    root = Path(tempfile.mkdtemp(prefix="reflect-b12-"))
    try:
        directory = root / "cache"
        started = time.perf_counter()
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=write_share, args=(str(directory), w, n // WRITERS, args.size, args.batch))
                 for w in range(WRITERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        wrote = time.perf_counter() - started
        disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        print(f"wrote {n} records of ~{args.size} chars with {WRITERS} processes in {wrote:.0f} s; "
              f"disk {disk / 1e6:.0f} MB ({len(list((directory / 'segments').iterdir()))} segments)")
        anchor_path = None
        sides = ["indexed"]
        if not args.no_anchor:
            anchor_path = str(root / "anchor_cache.py")
            Path(anchor_path).write_bytes(subprocess.run(
                ["git", "-C", str(REPO), "show", f"{ANCHOR_COMMIT}:reflect_trainer/cache.py"], check=True,
                capture_output=True).stdout)
            sides.append("anchor")
        for side in sides:  # warm-up: page cache, the first open of a cache written before builds nothing here
            run_side(side, str(directory), n, anchor_path)
        samples = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side in sides[round_ % len(sides):] + sides[: round_ % len(sides)]:
                samples[side].append(run_side(side, str(directory), n, anchor_path))
                print(f"  round {round_ + 1} {side}: open {samples[side][-1]['seconds']:.3f} s", flush=True)
        print(f"\nB12, {n} records of ~{args.size} chars, {WRITERS} writers, {os.cpu_count()} cores")
        for side in sides:
            s = samples[side]
            print(f"{side}:")
            print(f"  open                 {describe([x['seconds'] for x in s])} s")
            print(f"  RSS growth at open   {describe([x['rss_growth_mb'] for x in s], '.1f')} MB "
                  f"(peak {describe([x['peak_growth_mb'] for x in s], '.1f')} MB)")
            print(f"  get p50 / p99        {describe([x['get_p50_ms'] for x in s])} / "
                  f"{describe([x['get_p99_ms'] for x in s])} ms")
            print(f"  refresh, nothing new {describe([x['refresh_ms'] for x in s])} ms")
            print(f"  pickled              {s[0]['pickled_bytes']} bytes")
        if "anchor" in samples:
            ratio = statistics.median(x["seconds"] for x in samples["anchor"]) / statistics.median(
                x["seconds"] for x in samples["indexed"])
            print(f"open: indexed is {ratio:.1f}x faster than the anchor")
        print(f"refresh over 200 unchanged segments: {refresh_over_unchanged_segments(root):.2f} ms (median of 30)")
        print(f"disk: {disk / 1e6:.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
