"""A scripted cache workload run as a real subprocess by the cache fault tests (fault injection: no oracle).

``python tests/cache_workload.py '<json spec>'``: opens the cache, asks ``get_or_generate`` for ``keys`` in batches,
with a generate function that logs every key it is asked for to ``<calls>/<pid>.log`` (one ``O_APPEND`` write per
key, so the log survives ``kill -9``), then sleeps ``sleep`` seconds and answers ``answer:<key>``. Writes
``{key: raw}`` of what it got to ``out``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def expected_raw(key: str) -> str:
    return f"answer:{key}"


def counting_generate(calls_dir: str, sleep: float = 0.0, marker: str | None = None):
    """``generate`` for :meth:`RecycleCache.get_or_generate` that logs each key it generates, with this pid."""

    def generate(keys):
        fd = os.open(Path(calls_dir) / f"{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for k in keys:
                os.write(fd, f"{k}\n".encode())
        finally:
            os.close(fd)
        if marker:
            Path(marker).touch()
        time.sleep(sleep)
        return [{"key": k, "raw": expected_raw(k)} for k in keys], {}

    return generate


def generation_log(calls_dir) -> dict[int, list[str]]:
    """``{pid: keys it generated}`` from the logs written by :func:`counting_generate`."""
    out = {}
    for path in Path(calls_dir).glob("*.log"):
        out[int(path.stem)] = path.read_text().split()
    return out


def stored_lines(cache_dir) -> list[dict]:
    """Every record line on disk (checksums verified), across all segments."""
    from reflect_trainer.cache import _decode

    records = []
    for path in sorted((Path(cache_dir) / "segments").glob("*.jsonl")):
        for line in path.read_bytes().splitlines(keepends=True):
            record = _decode(line)
            if record is not None:
                records.append(record)
    return records


def main(spec: dict) -> None:
    from reflect_trainer.cache import RecycleCache

    cache = RecycleCache(spec["dir"], claim_lease_seconds=spec.get("lease", 60.0))
    generate = counting_generate(spec["calls"], spec.get("sleep", 0.0), spec.get("marker"))
    got = {}
    keys = spec["keys"]
    batch = spec.get("batch", 4)
    for start in range(0, len(keys), batch):
        fetched = cache.get_or_generate(keys[start : start + batch], generate)
        got.update({k: r["raw"] for k, r in fetched.records.items()})
    if spec.get("out"):
        tmp = Path(spec["out"] + ".tmp")  # whole or not at all: a test may kill -9 this process at any instant
        tmp.write_text(json.dumps({"got": got, "writer": cache.writer_id}))
        os.replace(tmp, spec["out"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
