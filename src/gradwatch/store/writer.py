"""Writing a run: one SQLite file per process, WAL mode, one transaction per flush.

A process killed at any moment leaves a file that opens: SQLite's journal guarantees a reader sees
every committed flush whole and nothing of a half-written one.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from gradwatch.errors import StoreError
from gradwatch.store.schema import CLOSED_KEY, DDL, EXIT_KEY, FORMAT, LAYER_COLUMNS, SCHEMA_VERSION
from gradwatch.store.series import LayerInfo


@dataclass
class FlushBatch:
    """Everything one flush writes, already on the host as plain Python numbers."""

    layers: Sequence[LayerInfo]
    steps: list[tuple[int, float | None, float | None, str, float]] = field(default_factory=list)
    layer_rows: list[tuple] = field(default_factory=list)  # (step, layer_name, *LAYER_COLUMNS)
    # rows that recorded the same columns, the others NULL: (columns, steps, layer_names, [values
    # of each column]). Binding only those made SQLite's inserts of a flush ~3x faster (most rows
    # hold 2 of the 10 columns: the gradient norm and the non-finite count)
    layer_blocks: list[tuple[tuple[str, ...], list[int], list[str], list[list[float]]]] = \
        field(default_factory=list)
    profile_rows: list[tuple[int, str, int, float]] = field(default_factory=list)
    events: list[tuple[int, str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


class RunStoreWriter:
    """Appends flushes to one store file (or to memory when `path` is None).

    `resume_at`: 0, a store written there before is replaced; N > 0, a training resumed at step N
    continues it: its steps before N are kept, those from N on are this run's to write again."""

    def __init__(self, path: str | os.PathLike | None, meta: dict | None = None, resume_at: int = 0):
        self.path = None if path is None else os.fspath(path)
        if self.path and not resume_at and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            # a run written there before is replaced, as `gradwatch run` does (an empty file is a
            # claim made by this run's own process and is kept)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.unlink(self.path + suffix)
        try:
            self._db = sqlite3.connect(self.path or ":memory:", check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create the store {self.path!r}: {exc}; choose a writable --out") from exc
        if self.path:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(DDL)
        self._layer_ids: dict[str, int] = dict(self._db.execute("SELECT name, id FROM layers"))
        with self._db:
            for table in ("steps", "layer_stats", "time_profile", "events"):  # what came after the checkpoint
                self._db.execute(f"DELETE FROM {table} WHERE step >= ?", (resume_at,))
            # how an earlier run of a resumed training ended (`gradwatch run` writes it at the end)
            self._db.executemany("DELETE FROM meta WHERE key = ?", [(EXIT_KEY,), (CLOSED_KEY,)])
            self._write_meta({"format": FORMAT, "schema_version": SCHEMA_VERSION, **(meta or {})})

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db

    def _write_meta(self, meta: dict) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in meta.items()],
        )

    def _sync_layers(self, layers: Iterable[LayerInfo]) -> None:
        for layer in layers:
            row = (layer.name, layer.type, layer.index, layer.role, layer.n_params, layer.activation)
            if layer.name in self._layer_ids:
                self._db.execute(
                    "UPDATE layers SET type=?, idx=?, role=?, n_params=?, activation=? WHERE name=?",
                    row[1:] + row[:1],
                )
            else:
                cur = self._db.execute(
                    "INSERT INTO layers (name, type, idx, role, n_params, activation) VALUES (?,?,?,?,?,?)",
                    row,
                )
                self._layer_ids[layer.name] = cur.lastrowid

    def write(self, batch: FlushBatch) -> None:
        """Write one flush in one transaction."""
        with self._db:
            self._sync_layers(batch.layers)
            if batch.meta:
                self._write_meta(batch.meta)
            self._db.executemany(
                "INSERT OR REPLACE INTO steps (step, loss, lr, lrs, wall_time) VALUES (?,?,?,?,?)",
                batch.steps,
            )
            ids = self._layer_ids
            self._insert_layer_rows(LAYER_COLUMNS, [(r[0], ids[r[1]], *r[2:]) for r in batch.layer_rows])
            for columns, steps, names, values in batch.layer_blocks:
                self._insert_layer_rows(columns, zip(steps, map(ids.__getitem__, names), *values))
            self._db.executemany(
                "INSERT OR REPLACE INTO time_profile (step, layer, t, grad_norm) VALUES (?,?,?,?)",
                [(s, ids[name], t, v) for s, name, t, v in batch.profile_rows],
            )
            self._db.executemany("INSERT INTO events (step, kind, detail) VALUES (?,?,?)", batch.events)

    def _insert_layer_rows(self, columns: Sequence[str], rows: Iterable[tuple]) -> None:
        placeholders = ",".join("?" * (2 + len(columns)))
        self._db.executemany(
            f"INSERT OR REPLACE INTO layer_stats (step, layer, {', '.join(columns)}) VALUES ({placeholders})", rows)

    def mark_closed(self) -> None:
        """The process that writes the store ends normally, its last steps stored (`CLOSED_KEY`)."""
        try:
            with self._db:
                self._write_meta({CLOSED_KEY: True})
        except sqlite3.Error:
            pass

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:
            pass


def finish_store(path: str | os.PathLike, exit_code: int, error: str = "") -> None:
    """Once the process writing `path` has ended: record how (meta `exit`: {"code": N}, 128+N for
    signal N) and fold its write-ahead log into the file. A process stopped by a signal, an
    exception or `os._exit` left its last steps in `-wal`, beside the file: a user copying the
    run's one documented file got fewer steps (52,000 of 54,388), or none ("not a gradwatch
    store") for a run shorter than SQLite's checkpoint interval. Best effort: a store that cannot
    be written now is still read whole where it is. `error`: what a training in the user's own
    process stopped on (a callback's fit that raised), said instead of an exit code."""
    try:
        db = sqlite3.connect(os.fspath(path), timeout=2)
    except sqlite3.Error:
        return
    try:
        with db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (EXIT_KEY, json.dumps({"code": int(exit_code), **({"error": error} if error else {})})))
        db.execute("PRAGMA journal_mode=DELETE")  # checkpoints the log and removes -wal and -shm
    except sqlite3.Error:
        pass
    finally:
        db.close()
