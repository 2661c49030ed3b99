"""The cache's index: the on-disk entry format of ``index/<writer>.idx`` and the in-memory table of where records
are. Imports nothing from the package (like :mod:`.cache`, its only user)."""

from __future__ import annotations

import hashlib
import json

import numpy as np


def _digest(key: str) -> int:
    """64 bits of the key's hash: what memory holds per record (a collision costs a read, never a wrong answer:
    every read checks the key)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


# ---- the index file format ---------------------------------------------------------------------------------------
#: One index entry on disk (little endian, 32 bytes).
_ENTRY = np.dtype([("digest", "<u8"), ("offset", "<u8"), ("length", "<u4"), ("crc", "<u4"), ("check", "<u8")])
#: One record's location in memory (28 bytes).
_LOC = np.dtype([("digest", "<u8"), ("offset", "<u8"), ("length", "<u4"), ("crc", "<u4"), ("seg", "<u4")])
_HEADER_BYTES = 512  # the writer's identity (JSON, space-padded, newline-terminated); entries follow
_SEAL_LENGTH = 0xFFFFFFFF  # an entry with this length seals the segment at its offset: nothing is appended after it
_CHECK_MAGIC = np.uint64(0x5EF1EC7ED1D0C0DE)


def _entry_check(digest, offset, length, crc):
    """A 64-bit mix of an entry's fields, vectorized: a torn, zeroed or shifted entry fails it (a zeroed one gives the
    magic constant, never 0)."""
    with np.errstate(over="ignore"):
        x = digest ^ (offset * np.uint64(0x9E3779B97F4A7C15))
        x = x ^ (((length.astype(np.uint64) << np.uint64(32)) | crc.astype(np.uint64)) * np.uint64(0xC2B2AE3D27D4EB4F))
        x = x ^ (x >> np.uint64(29))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(32))
    return x ^ _CHECK_MAGIC


def _entries(digests, offsets, lengths, crcs) -> bytes:
    e = np.empty(len(digests), dtype=_ENTRY)
    e["digest"], e["offset"], e["length"], e["crc"] = digests, offsets, lengths, crcs
    e["check"] = _entry_check(e["digest"], e["offset"], e["length"], e["crc"])
    return e.tobytes()


def _header(owner: dict) -> bytes:
    text = json.dumps(owner, ensure_ascii=True).encode()[: _HEADER_BYTES - 1]
    return text.ljust(_HEADER_BYTES - 1) + b"\n"


def _line_crc(line: bytes) -> int:
    return int(line[:8], 16)


class _Locations:
    """``digest -> where its records are``, as sorted numpy columns (struct of arrays, so a look-up's binary search
    runs on one contiguous array): a large base and a small delta, merged into the base when it grows. Adding a
    batch costs O(batch log batch), a look-up O(log n). Counts distinct keys and duplicates (copies of a key with
    different content) as entries arrive."""

    FIELDS = _LOC.names

    def __init__(self):
        self.base = self._empty()
        self.delta = self._empty()
        self.distinct = 0
        self.duplicates = 0

    @staticmethod
    def _empty() -> dict[str, np.ndarray]:
        return {name: np.empty(0, dtype=_LOC[name]) for name in _LOC.names}

    @staticmethod
    def _merge(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [p for p in parts if len(p["digest"])]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return _Locations._empty()
        digests = np.concatenate([p["digest"] for p in parts])
        order = np.argsort(digests, kind="stable")
        out = {"digest": digests[order]}
        del digests
        for name in _LOC.names[1:]:  # one column at a time: the peak is one column, not the whole table
            out[name] = np.concatenate([p[name] for p in parts])[order]
        return out

    def __len__(self) -> int:
        return len(self.base["digest"]) + len(self.delta["digest"])

    def add(self, new: np.ndarray) -> None:
        if not len(new):
            return
        order = np.argsort(new["digest"], kind="stable")
        cols = {name: np.ascontiguousarray(new[name][order]) for name in _LOC.names}
        d = cols["digest"]
        seen_before = np.zeros(len(d), dtype=bool)
        for part in (self.base, self.delta):
            if len(part["digest"]):
                lo = np.searchsorted(part["digest"], d, "left")
                seen_before |= np.searchsorted(part["digest"], d, "right") > lo
        repeated = np.zeros(len(d), dtype=bool)
        repeated[1:] = d[1:] == d[:-1]
        repeated[:-1] |= d[:-1] == d[1:]
        plain = ~(seen_before | repeated)
        self.distinct += int(np.count_nonzero(plain))
        crcs_of: dict[int, set] = {}
        for i in np.nonzero(~plain)[0]:  # rare: keys seen before (compaction copies, duplicates) or twice here
            digest = int(d[i])
            if digest not in crcs_of:
                crcs_of[digest] = {int(c) for c in self.find(digest)["crc"]}
                if not crcs_of[digest]:
                    self.distinct += 1
            crc = int(cols["crc"][i])
            if crcs_of[digest] and crc not in crcs_of[digest]:
                self.duplicates += 1
            crcs_of[digest].add(crc)
        if len(d) + len(self.delta["digest"]) > max(8192, len(self.base["digest"]) // 8):
            self.base = self._merge(self.base, self.delta, cols)
            self.delta = self._empty()
        else:
            self.delta = self._merge(self.delta, cols)

    def _rows(self, part: dict[str, np.ndarray], lo: int, hi: int) -> np.ndarray:
        out = np.empty(hi - lo, dtype=_LOC)
        for name in _LOC.names:
            out[name] = part[name][lo:hi]
        return out

    def find(self, digest: int) -> np.ndarray:
        key = np.uint64(digest)
        rows = []
        for part in (self.base, self.delta):
            lo = int(np.searchsorted(part["digest"], key, "left"))
            hi = int(np.searchsorted(part["digest"], key, "right"))
            if hi > lo:
                rows.append(self._rows(part, lo, hi))
        if not rows:
            return np.empty(0, dtype=_LOC)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def contains(self, digest: int) -> bool:
        key = np.uint64(digest)
        for part in (self.base, self.delta):
            col = part["digest"]
            i = int(np.searchsorted(col, key, "left"))
            if i < len(col) and col[i] == key:
                return True
        return False

    def drop_segments(self, ordinals: set[int]) -> None:
        """Forget the entries of segments that are gone (merged by a compaction), and recount."""
        merged = self._merge(self.base, self.delta)
        keep = ~np.isin(merged["seg"], np.fromiter(ordinals, dtype=np.uint32, count=len(ordinals)))
        self.base = {name: col[keep] for name, col in merged.items()}
        self.delta = self._empty()
        d, c = self.base["digest"], self.base["crc"]  # sorted by digest
        if not len(d):
            self.distinct = self.duplicates = 0
            return
        order = np.lexsort((c, d))
        d, c = d[order], c[order]
        self.distinct = 1 + int(np.count_nonzero(d[1:] != d[:-1]))
        self.duplicates = 1 + int(np.count_nonzero((d[1:] != d[:-1]) | (c[1:] != c[:-1]))) - self.distinct

    def all(self) -> np.ndarray:
        merged = self._merge(self.base, self.delta)
        return self._rows(merged, 0, len(merged["digest"]))
