"""Streaming a store's rows step by step, from a given step on: what live sinks (TensorBoard, a
framework's logger, the status line) need after each flush, without re-reading the whole run."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gradwatch.store.reader import connect
from gradwatch.store.schema import LAYER_COLUMNS


@dataclass
class StepRows:
    """One recorded step: loss, lr, and the recorded (layer, metric, value) triples. `roles`
    maps each layer to its role (param, activation, recurrent)."""

    step: int
    loss: float | None
    lr: float | None
    values: list[tuple[str, str, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # each param group's (`lr` is the first one's)


def layer_roles(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT name, role FROM layers ORDER BY idx, id"))


def rows_since(db: sqlite3.Connection, after: int = -1) -> Iterator[StepRows]:
    """Every step after `after`, in step order, streamed (the rows are read in primary-key order:
    no sort, and memory stays flat for a run of any length)."""
    names = dict(db.execute("SELECT id, name FROM layers"))
    steps = db.execute("SELECT step, loss, lr, lrs FROM steps WHERE step > ? ORDER BY step", (after,))
    stats = db.execute(f"SELECT step, layer, {', '.join(LAYER_COLUMNS)} FROM layer_stats WHERE step > ? "
                       "ORDER BY step, layer", (after,))
    pending = next(stats, None)
    for step, loss, lr, lrs in steps:
        row = StepRows(step, loss, lr, lrs=_floats(lrs))
        while pending is not None and pending[0] <= step:
            if pending[0] == step:
                layer = names[pending[1]]
                row.values += [(layer, m, v) for m, v in zip(LAYER_COLUMNS, pending[2:]) if v is not None]
            pending = next(stats, None)
        yield row


def _floats(text: str | None) -> list[float]:
    """The stored JSON list of the param groups' learning rates (none: an old or a hand-made store)."""
    try:
        values = json.loads(text) if text else []
    except ValueError:
        return []
    return [float(v) for v in values if isinstance(v, (int, float))] if isinstance(values, list) else []


def last_step(db: sqlite3.Connection) -> StepRows | None:
    row = db.execute("SELECT max(step) FROM steps").fetchone()
    if row is None or row[0] is None:
        return None
    return next(rows_since(db, row[0] - 1), None)


class WatchStore:
    """The store a `Watch` writes, opened for reading: its file, read-only, once it exists; an
    in-memory store through the writer's own connection."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None

    def connection(self, watch) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        path = getattr(watch, "store_path", None)
        if path is not None:
            if Path(path).exists():
                self._db = connect(path)
            return self._db
        writer = getattr(watch, "_writer", None)  # out=None: the store lives in the writer's memory
        return writer.connection if writer is not None else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
