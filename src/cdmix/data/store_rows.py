"""Reading rows of a store's ``images.npy``: positional reads through the page cache, and views that
behave like arrays of some rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cdmix.errors import UserError


class RowReader:
    """Reads rows of an ``.npy`` array straight from the file with positional reads (``os.preadv``).

    Reads go through the page cache, not a memory map of the process, so reading a store larger
    than memory keeps the process's resident memory at the size of the batches. Thread-safe.
    """

    def __init__(self, path: str | Path):
        self._fd: int | None = None
        self._pid = -1
        array = np.load(path, mmap_mode="r")
        self.path = str(path)
        self.shape = array.shape
        self.offset = int(array.offset)
        self.row_bytes = int(np.prod(array.shape[1:]))
        del array

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = array[rows[i]]``; ``out`` is a C-contiguous uint8 array of len(rows) rows.
        Rows are read in file order; runs of consecutive rows with one read."""
        fd, n = self._file(), len(rows)
        flat = memoryview(out.reshape(n, self.row_bytes)).cast("B")
        order = np.argsort(rows, kind="stable")
        i = 0
        while i < n:
            j = i + 1
            while j < n and rows[order[j]] == rows[order[j - 1]] + 1 and order[j] == order[j - 1] + 1:
                j += 1
            first, row = int(order[i]), int(rows[order[i]])
            view = flat[first * self.row_bytes:(first + j - i) * self.row_bytes]
            position = self.offset + row * self.row_bytes
            while len(view):
                got = os.preadv(fd, [view], position)
                if got <= 0:
                    raise UserError(f"{self.path} is truncated (row {row}); prepare the store again")
                view, position = view[got:], position + got
            i = j

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


class StoreView:
    """Some rows of a store's images, read on demand: behaves like an ``N x S x S x C`` uint8 array
    for ``len``, ``shape``, ``dtype``, ``nbytes`` and slicing (``view[idx]`` is again a view);
    ``np.asarray(view)`` or ``view.take(idx)`` reads the pixels."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, reader: RowReader, rows: np.ndarray):
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows),) + tuple(self.reader.shape[1:])

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.reader.row_bytes

    def __getitem__(self, key) -> "StoreView | np.ndarray":
        if isinstance(key, (int, np.integer)):
            return self.take(np.asarray([key]))[0]
        return StoreView(self.reader, self.rows[key])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The images at positions ``idx`` of this view, as an array."""
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        out = np.empty((len(rows),) + self.shape[1:], dtype=np.uint8)
        self.reader.read_into(rows, out)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.uint8)
        step = max(1, (64 << 20) // max(self.reader.row_bytes, 1))
        for start in range(0, len(self.rows), step):
            self.reader.read_into(self.rows[start:start + step], out[start:start + step])
        return out if dtype is None else out.astype(dtype)

    def copy(self) -> np.ndarray:
        return np.asarray(self)
