"""A read-only view of several [rows, dim] arrays stacked along the rows, without copying them.

`load_embeddings(dir, mmap=True)` returns one over the memory-mapped shards: indexing reads only the rows asked for,
so an output larger than memory can be searched or batched. `np.asarray(view)` makes the full copy explicitly.
"""

from __future__ import annotations

import numpy as np


class StackedRows:
    """Rows of `parts` (2-D arrays with equal columns and dtype) as one [sum of rows, dim] array, read lazily.

    Supports len(), .shape, .dtype, .ndim, iteration over rows, indexing by an int, a slice, an integer or boolean
    array (rows), optionally followed by a column index (``view[10:20, :8]``); each returns a NumPy array holding
    only the selected rows. `parts` gives the underlying arrays (memory maps for load_embeddings), `chunks()` walks
    them in order, and `np.asarray(view)` concatenates everything (one full copy).
    """

    def __init__(self, parts: list[np.ndarray], dim: int, dtype):
        self.parts = list(parts)
        self.dtype = np.dtype(dtype)
        self._dim = dim
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])  # part i holds rows starts[i] .. starts[i+1]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, dim)."""
        return int(self._starts[-1]), self._dim

    @property
    def ndim(self) -> int:
        """Always 2."""
        return 2

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"StackedRows(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("StackedRows cannot be turned into one array without a copy")
        whole = np.concatenate(self.parts) if self.parts else np.zeros((0, self._dim), self.dtype)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def chunks(self):
        """The parts in row order, as they are (no copy)."""
        return iter(self.parts)

    def __iter__(self):
        for part in self.parts:
            yield from part

    def __getitem__(self, key):
        rows, cols = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if len(cols) > 1:
            raise IndexError(f"too many indices for a 2-D array: {key!r}")
        picked = self._rows(rows)
        if not cols:
            return picked
        return picked[cols] if picked.ndim == 1 else picked[(Ellipsis,) + cols]

    def _rows(self, rows):
        n = len(self)
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + n if rows < 0 else int(rows)
            if not 0 <= i < n:
                raise IndexError(f"row {rows} is out of bounds for {n} rows")
            part = int(np.searchsorted(self._starts, i, side="right")) - 1
            return np.asarray(self.parts[part][i - self._starts[part]])
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            rows = np.arange(start, stop, step)
        index = np.asarray(rows)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"boolean index of shape {index.shape} for {n} rows")
            index = np.flatnonzero(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"rows must be an int, a slice, or an integer or boolean array, not {rows!r}")
        index = np.where(index < 0, index + n, index)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row index out of bounds for {n} rows")
        out = np.empty((index.size, self._dim), self.dtype)
        part_of = np.searchsorted(self._starts, index, side="right") - 1
        for part in np.unique(part_of):
            where = np.flatnonzero(part_of == part)
            out[where] = self.parts[part][index[where] - self._starts[part]]
        return out.reshape(index.shape + (self._dim,))

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self._dim), self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1 if stop > start else len(self.parts)
        for part in range(max(first, 0), len(self.parts)):
            lo, hi = self._starts[part], self._starts[part + 1]
            if lo >= stop:
                break
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out[a - start:b - start] = self.parts[part][a - lo:b - lo]
        return out
