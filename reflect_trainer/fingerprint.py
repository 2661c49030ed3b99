"""Content identity of model weights, for cache keys: every byte counts, and each file is hashed once.

A weights file changed anywhere (a LoRA merged into the middle of a shard keeps its size) must change the identity,
or old oracle outputs would be served silently. Hashing a 7B model's 13 GB takes a while, so each file's hash is
remembered by (path, size, mtime_ns, ctime_ns, inode), in memory and in
``$XDG_CACHE_HOME/reflect_trainer/file_hashes.json`` (default ``~/.cache``): rewriting a file changes its mtime, ctime
or inode, and it is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

_MAX_REMEMBERED = 2000  # entries kept in the file (the oldest go first)
_memo: dict[str, str] = {}
_lock = threading.Lock()


def hashes_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reflect_trainer" / "file_hashes.json"


def _read_remembered() -> dict[str, str]:
    try:
        data = json.loads(hashes_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: str, digest: str) -> None:
    """Merge with what other processes wrote, then replace the file atomically (a lost race costs a rehash)."""
    remembered = {**_read_remembered(), key: digest}
    remembered = dict(list(remembered.items())[-_MAX_REMEMBERED:])
    path = hashes_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(remembered))
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: the hash is kept in memory only
        logger.debug("cannot remember file hashes in %s: %s", path, err)


def _hash_content(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of the file's content, computed once per version of the file."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    with _lock:
        if key not in _memo:
            _memo.update(_read_remembered())
        if key in _memo:
            return _memo[key]
    if st.st_size > 1 << 30:
        logger.info("hashing %s (%.1f GB) once, for the oracle's cache identity", path, st.st_size / 1e9)
    digest = _hash_content(path)
    with _lock:
        _memo[key] = digest
        _remember(key, digest)
    return digest


def weights_fingerprint(path: Path) -> str:
    """Identity of a weights folder (or one file) that survives copies and moves: each file's name and the hash of
    its whole content (hidden files left out)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        if f.is_file() and not f.name.startswith("."):
            h.update(f"{f.name}:{file_hash(f)}:".encode())
    return h.hexdigest()[:16]
