"""A scripted cache workload (fault injection: no model), run as real processes by the cache fault tests
(``tests/test_cache_faults.py``) and the fault harness (``benchmarks/faults.py``).

``python -m test_support.cache_workload '<json spec>'`` (the repository root on ``PYTHONPATH``): opens the cache in
``dir`` (claim lease ``lease`` seconds, default 60), asks ``get_or_generate`` for ``keys`` in batches of ``batch``
(default 4) with :func:`counting_generate` (logs under ``calls``, file tag ``tag``; sleeps ``sleep`` seconds per
batch; touches ``marker`` once it generates). Writes ``{"got": {key: raw}, "writer": id, "taken_over": n}`` to
``out``; a write error (disk full) is reported as ``got["__error__"]``. Faults: ``failpoint`` armed before batch
``arm_after`` (``$REFLECT_CACHE_FAILPOINT``), ``fsize``: a file size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path


def expected_raw(key: str) -> str:
    """The scripted answer to ``key``: a stored or returned record with another text is a wrong cache hit."""
    return f"answer:{key}"


def counting_generate(calls_dir, sleep: float = 0.0, marker: str | None = None, tag: str | None = None,
                      cache=None):
    """``generate`` for :meth:`RecycleCache.get_or_generate` that logs each key it generates to
    ``<calls_dir>/[<tag>-]<pid>.log``: one line per key, followed by ``cache``'s writer id when a cache is given (so a
    generation can be matched with the segment that stored it). One ``O_APPEND`` write per batch: the log survives
    ``kill -9``."""

    def generate(keys):
        name = f"{tag}-{os.getpid()}.log" if tag else f"{os.getpid()}.log"
        writer = f" {cache.writer_id}" if cache is not None else ""
        fd = os.open(Path(calls_dir) / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, "".join(f"{k}{writer}\n" for k in keys).encode())
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
        out[int(path.stem.rsplit("-", 1)[-1])] = [line.split(" ", 1)[0] for line in path.read_text().splitlines()]
    return out


def run(spec: dict) -> None:
    """One worker process: see the module docstring for ``spec``."""
    from reflect_trainer.cache import CacheWriteError, RecycleCache

    if spec.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], resource.RLIM_INFINITY))
    logging.getLogger("reflect_trainer").setLevel(logging.ERROR)  # takeovers are counted, not logged, here
    cache = RecycleCache(spec["dir"], claim_lease_seconds=spec.get("lease", 60.0))
    generate = counting_generate(spec["calls"], spec.get("sleep", 0.0), spec.get("marker"), spec.get("tag"), cache)
    got, keys, batch, taken_over = {}, spec["keys"], spec.get("batch", 4), 0
    try:
        for n, start in enumerate(range(0, len(keys), batch)):
            if spec.get("failpoint") and n == spec.get("arm_after", 0):  # a kill -9 or a full disk at that point
                os.environ["REFLECT_CACHE_FAILPOINT"] = spec["failpoint"]
            fetched = cache.get_or_generate(keys[start : start + batch], generate)
            got.update({k: r["raw"] for k, r in fetched.records.items()})
            taken_over += fetched.taken_over
    except CacheWriteError as err:
        got["__error__"] = str(err)
    if spec.get("fsize"):  # space is back for the report
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    if spec.get("out"):
        # Written whole or not at all: a test or the harness may kill -9 this process at any instant.
        tmp = Path(spec["out"] + ".tmp")
        tmp.write_text(json.dumps({"got": got, "writer": cache.writer_id, "taken_over": taken_over}))
        os.replace(tmp, spec["out"])


def command(spec: dict) -> list[str]:
    """The command line of one worker process (run it with the repository root on ``PYTHONPATH``)."""
    return [sys.executable, "-m", "test_support.cache_workload", json.dumps(spec)]


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
