"""What the trainer remembers per row, off the Python heap: one rank's ledger.

For export and resume the trainer remembers, per row of its share, the features a row trained on and the row as
exported. Kept as Python objects that is tens of KB a row (gigabytes at 52k rows), so :class:`RowLedger` writes each
record once to a per-rank file and keeps only its place in the file, in numpy arrays (16 bytes a row), and
:class:`TrainOrder` keeps the order rows were first trained in as one int64 a row.

The file is anonymous (``tempfile.TemporaryFile``: created without a name, or unlinked at once), so it is this
process's alone, and the kernel removes it when the process ends, however it ends (kill -9 included); :meth:`close`
frees it earlier. Records are pickled: a row's values come back exactly as they went in (``None``, tuples, floats,
dict key types), which JSON would not guarantee for every column a data set may hold.

Rows are keyed by their position (``int``, map-style data: arrays of a fixed size) or, for streams, by any hashable
key (the trainer's content hash): a stream keeps a small dict entry per row, key -> slot, next to the arrays.

This module imports nothing from the package (a layer that can be tested alone).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import threading
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_ABSENT = -1  # offset of a row with no record
_NONE = -2  # offset of a row whose record is ``None`` (nothing written)


class _Slots:
    """Row key -> slot in the arrays: the position itself (``n_rows`` given) or, for streams, a growing dict."""

    def __init__(self, n_rows: int | None):
        self.fixed = n_rows is not None
        self._ids: dict[Hashable, int] | None = None if self.fixed else {}
        self.capacity = int(n_rows) if self.fixed else 0

    def find(self, key) -> int:
        """The slot of ``key``, or -1 when it has none."""
        if self.fixed:
            if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= key < self.capacity:
                return int(key)
            return -1
        return self._ids.get(key, -1)

    def make(self, key) -> int:
        """The slot of ``key``, created if needed (streams); the caller grows its arrays to :attr:`capacity`."""
        slot = self.find(key)
        if slot >= 0:
            return slot
        if self.fixed:
            raise KeyError(f"row {key!r} is not a row of this data set (0..{self.capacity - 1})")
        slot = self._ids[key] = len(self._ids)
        if slot >= self.capacity:
            self.capacity = max(1024, 2 * self.capacity)
        return slot

    def keys(self) -> Iterator:
        return iter(range(self.capacity)) if self.fixed else iter(self._ids)

    def __len__(self) -> int:
        return self.capacity if self.fixed else len(self._ids)


def _grown(array: np.ndarray, capacity: int, fill: int) -> np.ndarray:
    if len(array) >= capacity:
        return array
    out = np.full(capacity, fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


class RowLedger:
    """A per-row record store on disk, with the interface of the dict it replaces.

    ``ledger[row] = value`` pickles ``value`` to the end of the file (``None`` is remembered without a write),
    ``ledger[row]`` reads it back with one ``pread``, ``row in ledger`` and :meth:`get` look at the arrays only. A row
    written twice keeps its last record. Writes and reads may come from different threads.

    Args:
        n_rows: The number of rows of a map-style data set (keys ``0..n_rows-1``), or ``None`` for any hashable keys
            (streams: a dict entry per key).
        directory: Where the anonymous file is created (created if missing); the system's temporary directory if
            ``None``. Nothing is ever left there under a name.
    """

    def __init__(self, n_rows: int | None = None, directory: str | os.PathLike | None = None):
        self._slots = _Slots(n_rows)
        self._offsets = np.full(self._slots.capacity, _ABSENT, dtype=np.int64)
        self._lengths = np.zeros(self._slots.capacity, dtype=np.int64)
        self._directory = directory
        self._file = None  # opened on the first write: a ledger nobody writes to costs no file
        self._end = 0
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._count = 0

    # ---- dict interface --------------------------------------------------------------------------------------
    def __contains__(self, key) -> bool:
        slot = self._slots.find(key)
        return slot >= 0 and self._offsets[slot] != _ABSENT

    def __getitem__(self, key) -> Any:
        slot = self._slots.find(key)
        offset = self._offsets[slot] if slot >= 0 else _ABSENT
        if offset == _ABSENT:
            raise KeyError(key)
        if offset == _NONE:
            return None
        return pickle.loads(self._read(int(offset), int(self._lengths[slot])))

    def get(self, key, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __setitem__(self, key, value: Any) -> None:
        blob = None if value is None else pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            slot = self._slots.make(key)
            if slot >= len(self._offsets):
                self._offsets = _grown(self._offsets, self._slots.capacity, _ABSENT)
                self._lengths = _grown(self._lengths, self._slots.capacity, 0)
            if self._offsets[slot] == _ABSENT:
                self._count += 1
            if blob is None:
                self._offsets[slot], self._lengths[slot] = _NONE, 0
                return
            offset = self._append(blob)
            self._offsets[slot], self._lengths[slot] = offset, len(blob)

    def __len__(self) -> int:
        """The number of rows with a record (``None`` included)."""
        return self._count

    def __iter__(self) -> Iterator:
        """The rows with a record: in row order (map-style), in the order first written (streams)."""
        if self._slots.fixed:
            return iter(np.flatnonzero(self._offsets != _ABSENT).tolist())
        return (key for key, slot in self._slots._ids.items() if self._offsets[slot] != _ABSENT)

    def present(self) -> np.ndarray:
        """A map-style ledger's rows as a bool array: ``True`` where a row has a record."""
        if not self._slots.fixed:
            raise ValueError("a ledger of streamed rows has no known set of rows")
        return self._offsets != _ABSENT

    def missing(self, rows: Iterable | None = None) -> list:
        """The rows of ``rows`` (default: every row of a map-style data set) that have no record, in order."""
        if rows is None:
            if not self._slots.fixed:
                raise ValueError("a ledger of streamed rows has no known set of rows")
            return np.flatnonzero(self._offsets == _ABSENT).tolist()
        return [r for r in rows if r not in self]

    # ---- the file ----------------------------------------------------------------------------------------------
    @property
    def file_bytes(self) -> int:
        """Bytes written to the file so far (rewritten rows count twice)."""
        return self._end

    def nbytes(self) -> int:
        """Bytes this object holds in memory for its rows (the arrays; streams: plus their key dict)."""
        size = self._offsets.nbytes + self._lengths.nbytes
        if not self._slots.fixed:
            import sys

            size += sys.getsizeof(self._slots._ids) + sum(sys.getsizeof(k) for k in self._slots._ids)
        return size

    def _append(self, blob: bytes) -> int:
        if os.getpid() != self._pid:
            raise RuntimeError("a RowLedger belongs to the process that made it; a forked child cannot write to it")
        if self._file is None:
            try:
                if self._directory is not None:
                    os.makedirs(self._directory, exist_ok=True)
                self._file = tempfile.TemporaryFile(prefix="reflect-ledger-", dir=self._directory, buffering=0)
            except OSError as err:  # e.g. a read-only output folder: the system's temporary folder will do
                logger.warning("ledger: cannot create a file in %s (%s); using the temporary folder",
                               self._directory, err)
                self._file = tempfile.TemporaryFile(prefix="reflect-ledger-", buffering=0)
        offset, view = self._end, memoryview(blob)
        while view:  # a regular file takes it in one write; a short write is continued, never lost
            written = os.pwrite(self._file.fileno(), view, offset + len(blob) - len(view))
            view = view[written:]
        self._end += len(blob)
        return offset

    def _read(self, offset: int, length: int) -> bytes:
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(self._file.fileno(), length - done, offset + done)
            if not chunk:
                raise OSError(f"ledger file ends at {offset + done} bytes, before the record of {length} bytes at "
                              f"{offset} (was the file truncated?)")
            chunks.append(chunk)
            done += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        """Free the file now (the kernel frees it at process exit anyway); the ledger is empty afterwards."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._offsets[:] = _ABSENT
            self._end = self._count = 0

    def __del__(self):
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


class TrainOrder:
    """The rows trained so far, in the order first trained: one int64 a row (map-style), a dict for streams.

    ``add(row)`` records a row the first time; iterating gives the rows in that order.
    """

    def __init__(self, n_rows: int | None = None):
        self._slots = _Slots(n_rows)
        self._first = np.full(self._slots.capacity, -1, dtype=np.int64) if self._slots.fixed else None
        self._ordered: dict[Hashable, bool] | None = None if self._slots.fixed else {}
        self._count = 0

    def add(self, row) -> None:
        if self._ordered is not None:
            self._ordered.setdefault(row, True)
            return
        slot = self._slots.make(row)
        if self._first[slot] < 0:
            self._first[slot] = self._count
            self._count += 1

    def __contains__(self, row) -> bool:
        if self._ordered is not None:
            return row in self._ordered
        slot = self._slots.find(row)
        return slot >= 0 and self._first[slot] >= 0

    def __len__(self) -> int:
        return len(self._ordered) if self._ordered is not None else self._count

    def __iter__(self) -> Iterator:
        if self._ordered is not None:
            return iter(list(self._ordered))
        rows = np.flatnonzero(self._first >= 0)
        return iter(rows[np.argsort(self._first[rows], kind="stable")].tolist())

    # A resumed run's export must still hold the rows trained before the checkpoint: each rank saves its list in the
    # checkpoint. Written whole (temporary file, fsync, then rename), before the Trainer's files: the checkpoint's
    # trainer_state.json appears only after every rank passed the save's barrier (trl_bridge.TrainerHooks), so a
    # checkpoint a kill -9 left with a trainer state has every list.
    @staticmethod
    def _path(folder: str, rank: int) -> str:
        return os.path.join(folder, f"reflect_trained-{rank}.json")

    def save(self, folder: str, rank: int) -> None:
        os.makedirs(folder, exist_ok=True)
        path = self._path(folder, rank)
        with open(path + ".tmp", "w") as f:
            json.dump(list(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def load(self, folder: str, rank: int) -> None:
        """Add the rows a checkpoint's list holds (none when it has no list: a run resumed from a plain one)."""
        path = self._path(folder, rank)
        if os.path.isfile(path):
            with open(path) as f:
                for row in json.load(f):
                    self.add(row)
