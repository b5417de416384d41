"""Shrinking a run to what a page can show: step blocks (max or median) and the chosen steps.

Presentation only: nothing here is a statistic of the run; a block's maximum is shown so a
spike of one step stays visible however many steps share a pixel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from gradwatch.store.series import RunSeries

MAX_COLUMNS = 800  # heat-map columns: about one per pixel of the picture
MAX_POINTS = 2000  # loss-curve points


@dataclass
class Blocks:
    """Rows of a series grouped into consecutive blocks of `size` recorded steps."""

    steps: np.ndarray  # first step of each block
    size: int
    n_steps: int  # recorded steps before grouping

    @property
    def note(self) -> str:
        if self.size == 1:
            return ""
        return f"{self.n_steps:,} recorded steps shown in {len(self.steps):,} blocks of {self.size:,}"


def reduce_blocks(steps: np.ndarray, values: np.ndarray, limit: int, how: str = "max") -> tuple[Blocks, np.ndarray]:
    """Group the rows of `values` (steps × ...) into at most `limit` blocks of consecutive rows.

    how: "max" (NaN = not recorded is ignored; +inf, a measured non-finite value, wins),
    "median", "min". A block with nothing recorded stays NaN."""
    n = len(steps)
    size = max(1, -(-n // limit))
    if size == 1:
        return Blocks(np.asarray(steps), 1, n), np.asarray(values, dtype=float)
    n_blocks = -(-n // size)
    pad = n_blocks * size - n
    v = np.asarray(values, dtype=float)
    if pad:
        v = np.concatenate([v, np.full((pad,) + v.shape[1:], np.nan)])
    v = v.reshape((n_blocks, size) + v.shape[1:])
    reducer = {"max": np.nanmax, "min": np.nanmin, "median": np.nanmedian}[how]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        out = reducer(v, axis=1)
    return Blocks(np.asarray(steps)[::size], size, n), out


def recorded_rows(values: np.ndarray) -> np.ndarray:
    """Rows (steps) where at least one column was recorded."""
    if values.ndim == 1:
        return np.flatnonzero(~np.isnan(values))
    return np.flatnonzero(~np.isnan(values).all(axis=1))


def layer_columns(run: RunSeries, roles: tuple[str, ...]) -> list[int]:
    """Columns of the layers of these roles, input first."""
    cols = [i for i, layer in enumerate(run.layers) if layer.role in roles]
    return sorted(cols, key=lambda i: run.layers[i].index)


def chosen_steps(run: RunSeries, metric: str = "grad_norm", wanted: list[int] | None = None, n: int = 5) -> list[int]:
    """Steps for the gradient-flow picture: `wanted` (each moved to the nearest recorded step), or
    `n` steps spread evenly from the first recorded to the last (when some steps have a
    non-finite norm: `n - 1` spread over the others, and the first non-finite one)."""
    m = run.metrics.get(metric)
    rows = recorded_rows(m) if m is not None and m.size else np.empty(0, dtype=np.int64)
    if len(rows) == 0:
        return []
    recorded = run.steps[rows]
    if wanted:
        picked = [int(recorded[np.abs(recorded - w).argmin()]) for w in wanted]
        return list(dict.fromkeys(picked))
    # A run with non-finite norms: steps spread over those whose norms are all finite, then the
    # first non-finite one. Spread over all steps, a run that blew up at step 2 of 30 showed only
    # step 0 as a line and four steps of nothing but × marks (steps 0-1, the blow-up, not drawn).
    bad = np.isinf(m[rows].reshape(len(rows), -1)).any(axis=1)  # the store keeps NaN/Inf as +inf
    if bad.any() and not bad.all():
        good = recorded[~bad]
        picked = [int(good[i]) for i in np.linspace(0, len(good) - 1, min(n - 1, len(good))).round().astype(int)]
        picked.append(int(recorded[bad.argmax()]))
        return sorted(dict.fromkeys(picked))
    picked = [int(recorded[i]) for i in np.linspace(0, len(recorded) - 1, min(n, len(recorded))).round().astype(int)]
    return list(dict.fromkeys(picked))
