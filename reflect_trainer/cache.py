"""Persistent, content-addressed store of raw oracle texts, safe under crashes and concurrent writers.

Why this design and not SQLite: ranks on several machines often share only a network filesystem (NFS, Lustre),
where SQLite's locking and WAL are documented as unsafe. So every writer (process) appends to its *own* segment
file and nobody ever rewrites a file:

* ``segments/<host>-<pid>-<random>.jsonl``: one record per line, ``<crc32> <json>``. A batch is written, flushed and
  fsynced before the caller goes on, so a ``kill -9`` loses at most the batch in flight. A torn last line fails its
  checksum and is ignored on read; the cache always opens.
* Readers merge all segments into an in-memory index, re-reading only the bytes appended since the last look.
* ``claims/<key>``: created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+) before a key is sent
  to the oracle, removed after its record is durable. Two processes that want the same key never both generate it,
  so no key is stored twice. A claim left by a dead process (same host: its pid is gone; other host: older than
  ``claim_timeout``) is taken over.

Records hold the oracle's raw text, not parsed fields: parsing happens on read, so a parser fix needs no
regeneration (the key covers only what shapes the oracle's output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_key(payload: dict) -> str:
    """Content address: sha256 of the canonical JSON of everything that determines the oracle's output."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _encode(record: dict) -> bytes:
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def _decode(line: bytes) -> dict | None:
    try:
        text = line.decode()
        crc, body = text.rstrip("\n").split(" ", 1)
        if int(crc, 16) != zlib.crc32(body.encode()):
            return None
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None


class RecycleCache:
    """Append-only, multi-writer store of ``key -> record`` (``record["raw"]`` is the oracle's text).

    Args:
        directory: Shared by every process that recycles the same data (all ranks, all reruns).
        claim_timeout: Seconds after which a claim by a process on another host is presumed dead.
    """

    def __init__(self, directory: str | os.PathLike, claim_timeout: float = 3600.0):
        self.directory = Path(directory)
        self.segments_dir = self.directory / "segments"
        self.claims_dir = self.directory / "claims"
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        self.claim_timeout = claim_timeout
        self.host = socket.gethostname()
        self.writer_id = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._index: dict[str, dict] = {}
        self._offsets: dict[Path, int] = {}
        self._segment = None  # opened on first write: readers never create files
        self.duplicates_seen = 0  # records whose key was already indexed (should stay 0)
        self.refresh()

    # ---- reading -------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Index what other writers appended since the last call."""
        for path in sorted(self.segments_dir.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size <= offset:
                continue
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size - offset)
            # Only whole lines count; a partial tail (a write in flight, or torn by a crash) is read again later.
            last_newline = data.rfind(b"\n")
            if last_newline < 0:
                continue
            for line in data[: last_newline + 1].splitlines(keepends=True):
                record = _decode(line)
                if record is None:
                    logger.warning("ignoring a corrupt cache record in %s (torn write from a crash?)", path.name)
                    continue
                if record["key"] in self._index:
                    self.duplicates_seen += 1
                    continue
                self._index[record["key"]] = record
            self._offsets[path] = offset + last_newline + 1

    def get(self, key: str) -> dict | None:
        return self._index.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def records(self) -> list[dict]:
        return list(self._index.values())

    # ---- writing -------------------------------------------------------------------------------------------
    def put_many(self, records: list[dict]) -> None:
        """Append records (each with ``key`` and ``raw``) durably: flushed and fsynced before returning."""
        if not records:
            return
        if self._segment is None:
            self._segment = open(self.segments_dir / f"{self.writer_id}.jsonl", "ab")
        self._segment.write(b"".join(_encode(r) for r in records))
        self._segment.flush()
        os.fsync(self._segment.fileno())
        for r in records:
            self._index.setdefault(r["key"], r)
        self._offsets[Path(self._segment.name)] = self._segment.tell()
        for r in records:
            self.release(r["key"])

    # ---- claims ----------------------------------------------------------------------------------------------
    def _claim_path(self, key: str) -> Path:
        return self.claims_dir / key

    def try_claim(self, key: str) -> bool:
        """Claim ``key`` for this process. False if another live process holds it."""
        path = self._claim_path(key)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._claim_is_stale(path):
                    logger.warning("taking over a stale claim %s", path.name[:12])
                    path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump({"host": self.host, "pid": os.getpid(), "writer": self.writer_id, "t": time.time()}, f)
            return True
        return False

    def _claim_is_stale(self, path: Path) -> bool:
        try:
            info = json.loads(path.read_text() or "{}")
            age = time.time() - path.stat().st_mtime
        except (FileNotFoundError, ValueError):
            return True  # vanished, or torn by a crash between create and write
        if info.get("writer") == self.writer_id:
            return True  # our own leftover
        if info.get("host") == self.host:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError):
                pass
            return False
        return age > self.claim_timeout

    def release(self, key: str) -> None:
        self._claim_path(key).unlink(missing_ok=True)

    def wait_for(self, keys: list[str], poll: float = 0.5) -> list[str]:
        """Wait until ``keys`` claimed by others are stored. Returns the keys whose claim went stale instead."""
        pending = [k for k in keys if k not in self._index]
        orphaned: list[str] = []
        while pending:
            time.sleep(poll)
            self.refresh()
            still = []
            for k in pending:
                if k in self._index:
                    continue
                if not self._claim_path(k).exists() or self._claim_is_stale(self._claim_path(k)):
                    self.refresh()
                    if k not in self._index:
                        orphaned.append(k)
                    continue
                still.append(k)
            pending = still
        return orphaned

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None
