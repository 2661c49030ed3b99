"""The cache as it lies on disk: every record line of every segment, read without the cache's index, so a test can
count what was stored (twice, by which writer) rather than what the cache chooses to return."""

from __future__ import annotations

from pathlib import Path


def segment_files(cache_dir: str | Path) -> list[Path]:
    """The cache's segment files (one per writer), in name order."""
    return sorted((Path(cache_dir) / "segments").glob("*.jsonl"))


def records_by_writer(cache_dir: str | Path) -> dict[str, list[dict]]:
    """``{writer id: the records its segment holds}``, in file order; checksums verified (a torn or corrupt line is
    left out, as the cache leaves it out). A key stored twice appears twice."""
    from reflect_trainer.cache import _decode

    out = {}
    for path in segment_files(cache_dir):
        records = [_decode(line) for line in path.read_bytes().splitlines(keepends=True)]
        out[path.stem] = [r for r in records if r is not None]
    return out


def stored_records(cache_dir: str | Path) -> list[dict]:
    """Every record line on disk, across all segments (see :func:`records_by_writer`)."""
    return [r for records in records_by_writer(cache_dir).values() for r in records]
