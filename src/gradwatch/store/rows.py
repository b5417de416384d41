"""`RecordedRows`: a steps x layers metric kept as the rows where it was recorded, read as the dense
float64 array it stands for.

A long run's metrics as dense float64 arrays were 1.8 GB at 50k steps x 480 layers, and the
sampled ones (weight norms, update ratios, activation statistics: every 10th step) were 90% NaN.
Here a metric holds only its recorded rows, in float32 when every value read is a float32 (the
collector rounds norms to float32), so the NaN rows and half the bytes are not kept. Every read
gives float64 values equal to the dense array's, so the rules' arithmetic is unchanged.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


BLOCK = 4096  # rows a ufunc converts to float64 at a time


class RecordedRows(NDArrayOperatorsMixin):
    """Reads like a float64 array of `shape` (indexing, ufuncs, operators, `np.asarray`), `fill`
    (NaN) outside `rows`. Indexing builds only the rows asked for; an elementwise ufunc of it alone
    (`np.isinf(m)`, `m > 0`) is computed on the kept rows and on the fill once for the rest."""

    def __init__(self, n_rows: int, rows: np.ndarray, values: np.ndarray, fill: float = np.nan):
        self.rows = rows  # sorted row indices
        self.values = values  # (len(rows), layers), float32 or float64
        self.shape = (n_rows, values.shape[1])
        self.fill = fill  # the value of the other rows: NaN, not recorded (0.0 after np.nan_to_num)

    ndim = 2
    dtype = np.dtype(np.float64)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """The bytes kept (not those of the dense array it reads as)."""
        return self.rows.nbytes + self.values.nbytes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"RecordedRows(shape={self.shape}, recorded rows={len(self.rows)}, kept as {self.values.dtype})"

    def copy(self) -> np.ndarray:
        """The dense array, the caller's to change (a `RecordedRows` itself cannot be written)."""
        return np.asarray(self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = np.full(self.shape, self.fill)
        dense[self.rows] = self.values
        return dense if dtype is None else dense.astype(dtype, copy=False)

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) and len(key) == 2 else (key, slice(None))
        if isinstance(key, tuple) and len(key) != 2 or _is_array(rows) and _is_array(cols) \
                or isinstance(rows, np.ndarray) and rows.ndim > 1 or rows is Ellipsis or cols is Ellipsis:
            return np.asarray(self)[key]  # rare forms (paired index arrays, 2-D masks): from the dense array
        if isinstance(rows, (int, np.integer)):
            return self._rows(np.array([rows]), cols)[0]
        return self._rows(np.arange(self.shape[0])[rows], cols)

    def _rows(self, wanted: np.ndarray, cols) -> np.ndarray:
        """The dense rows `wanted` (indices, in that order), columns `cols` of them."""
        wanted = np.where(wanted < 0, wanted + self.shape[0], wanted)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        at = np.minimum(np.searchsorted(self.rows, wanted), max(len(self.rows) - 1, 0))
        hit = self.rows[at] == wanted if len(self.rows) else np.zeros(len(wanted), dtype=bool)
        width = np.empty((0, self.shape[1]))[:, cols].shape[1:]  # () for one column
        out = np.full((len(wanted), *width), self.fill)
        place, source = np.flatnonzero(hit), at[hit]
        for a in range(0, len(place), BLOCK):  # a block at a time: no copy of all the rows asked for
            out[place[a:a + BLOCK]] = _take(self.values, source[a:a + BLOCK], cols)
        return out

    def subset(self, row_mask: np.ndarray, cols: list[int]) -> "RecordedRows":
        """The rows where `row_mask` holds and the columns `cols`, still kept compact."""
        keep = row_mask[self.rows]
        renumber = np.cumsum(row_mask) - 1
        return RecordedRows(int(row_mask.sum()), renumber[self.rows[keep]], self.values[keep][:, cols], self.fill)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        ours = [x for x in inputs if isinstance(x, RecordedRows)]
        scalar = all(isinstance(x, RecordedRows) or np.ndim(x) == 0 for x in inputs)
        if method == "__call__" and ufunc.nout == 1 and ours == [self] and scalar and not kwargs:
            with np.errstate(all="ignore"):  # f(fill): what every unrecorded cell gives
                fill = np.asarray(ufunc(*(self.fill if x is self else x for x in inputs)))
            out = np.full(self.shape, fill)
            for a in range(0, len(self.rows), BLOCK):  # by blocks: no float64 copy of the rows kept
                part = ufunc(*(x.values[a:a + BLOCK].astype(np.float64, copy=False) if x is self else x
                               for x in inputs))
                if a == 0:
                    out = out.astype(np.result_type(fill, part), copy=False)
                out[self.rows[a:a + BLOCK]] = part
            return out
        dense = [np.asarray(x) if isinstance(x, RecordedRows) else x for x in inputs]
        return getattr(ufunc, method)(*dense, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        """`np.nan_to_num(m)` kept compact (whole, it was two steps x layers float64 arrays: 0.4 GB
        at 50k x 480 in the non-finite rule); any other numpy function reads the dense array."""
        if func is np.nan_to_num and args == (self,) and kwargs.get("copy", True):
            kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
            with np.errstate(all="ignore"):
                fill = float(np.nan_to_num(np.float64(self.fill), **kwargs))
                return RecordedRows(self.shape[0], self.rows, _nan_to_num(self.values, kwargs), fill)
        return func._implementation(*args, **kwargs)


def _nan_to_num(values: np.ndarray, options: dict) -> np.ndarray:
    """np.nan_to_num of the float64 values: float32 kept where that is the same (no ±inf, which
    float32 would map to its own largest number, and a float32 `nan` replacement)."""
    nan = options.get("nan", 0.0)
    if values.dtype == np.float32 and float(np.float32(nan)) == nan and not np.isinf(values).any():
        return np.nan_to_num(values, **options)
    return np.nan_to_num(values.astype(np.float64), **options)


def _take(values: np.ndarray, rows: np.ndarray, cols) -> np.ndarray:
    """values[rows][:, cols], without copying every column of the rows first (a rule reading one
    layer's column at a time copied the whole metric per layer)."""
    if isinstance(cols, slice):
        return values[:, cols][rows]
    if np.ndim(cols) == 0:
        return values[rows, cols]
    return values[np.ix_(rows, np.asarray(cols))]


def _is_array(key) -> bool:
    return isinstance(key, (list, np.ndarray)) and np.ndim(key) > 0


class RowsBuilder:
    """Collects a metric's values, chunk by chunk, as rows keyed by step: float32 while every value
    is exactly a float32, float64 from the first that is not. `capacity`: the rows to allocate
    (pages never written are never touched); full, it grows by a quarter (a live reader's)."""

    def __init__(self, n_cols: int, capacity: int = 0):
        self._values = np.empty((capacity, n_cols), dtype=np.float32)
        self._keys = np.empty(capacity, dtype=np.int64)  # the step of each row
        self._k = 0  # rows written

    def add_columns(self, n: int) -> None:
        """Columns for layers first seen now, NaN in the rows written."""
        old = self._values.shape[1]
        values = np.empty((len(self._values), old + n), dtype=self._values.dtype)
        values[:self._k, :old] = self._values[:self._k]
        values[:self._k, old:] = np.nan
        self._values = values

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows in all (a read's steps: no metric has more)."""
        if rows > len(self._values):
            self._grow(rows, self._values.dtype)

    def add(self, keys: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        """Values at steps `keys` (non-decreasing; the first may continue the last row added)."""
        if not len(keys):
            return
        wide = self._values.dtype == np.float32 and not _float32_exact(values)
        rows, where = np.unique(keys, return_inverse=True)
        start = self._k - 1 if self._k and rows[0] == self._keys[self._k - 1] else self._k
        end = start + len(rows)
        if wide or end > len(self._values):
            self._grow(end, np.float64 if wide else self._values.dtype)
        unsorted = start and rows[0] < self._keys[start - 1]  # a step held back, arriving late
        self._values[self._k:end] = np.nan
        self._keys[start:end] = rows
        self._values[start + where, cols] = values
        self._k = end
        if unsorted:
            order = np.argsort(self._keys[:end], kind="stable")
            self._keys, self._values = self._keys[order], self._values[order]

    def _grow(self, need: int, dtype) -> None:
        """New arrays (a series read before keeps its own): the rows written copied over."""
        room = len(self._values)
        capacity = room if need <= room else max(need, room + room // 4)  # widened only: the same room
        values = np.empty((capacity, self._values.shape[1]), dtype=dtype)
        values[:self._k] = self._values[:self._k]
        keys = np.empty(capacity, dtype=np.int64)
        keys[:self._k] = self._keys[:self._k]
        self._values, self._keys = values, keys

    def build(self, steps: np.ndarray, order: list[int] | None = None) -> RecordedRows:
        """The rows written, numbered by their place in `steps`; `order`: the columns, reordered."""
        values = self._values[:self._k]
        return RecordedRows(len(steps), np.searchsorted(steps, self._keys[:self._k]),
                            values if order is None else values[:, order])


def _float32_exact(values: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        back = values.astype(np.float32).astype(np.float64)
    return bool(np.array_equal(back, values, equal_nan=True))
