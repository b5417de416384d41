"""Reading a run back as numpy series (`read_run`), from a run directory or a store file."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

import numpy as np

from gradwatch.errors import StoreError
from gradwatch.store.schema import FORMAT, LAYER_COLUMNS
from gradwatch.store.series import LayerInfo, RunSeries

STORE_NAME = "gradwatch.sqlite"
READ_CHUNK_ROWS = 50_000


def store_files(run: str | os.PathLike) -> list[Path]:
    """The store files of a run directory, the main one first (rank 0, else the first process)."""
    path = Path(run)
    if path.is_file():
        return [path]
    if not path.exists():
        raise StoreError(f"no run at {str(path)!r}: give a run directory written by `gradwatch run` or a .sqlite store")
    files = sorted(path.glob("gradwatch*.sqlite"))
    if not files:
        inner = sorted({f.parent.name for f in path.glob("*/gradwatch*.sqlite")})
        if inner:  # a callback's distributed run: one directory per rank
            raise StoreError(f"{str(path)!r} holds one run per directory ({', '.join(inner[:4])}): give one of them, "
                             f"e.g. {str(path / inner[0])!r}")
        raise StoreError(f"{str(path)!r} holds no gradwatch store (gradwatch*.sqlite); was the run watched?")
    preferred = [path / STORE_NAME, path / "gradwatch-rank0.sqlite"]
    head = [f for f in preferred if f in files][:1]
    return head + [f for f in files if f not in head]


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """Open a store read-only and check it is one."""
    path = Path(path)
    uri = f"file:{quote(str(path.absolute()))}"  # quoted: '#', '?' or '%' in a path are a URI's own
    # read-only first; then immutable, for a finished run where nothing can be written (no -shm beside it)
    for mode in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"{uri}?{mode}", uri=True)
            row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            break
        except sqlite3.OperationalError as exc:
            error = exc
        except sqlite3.Error as exc:
            raise StoreError(f"{str(path)!r} is not a gradwatch store ({exc})") from exc
    else:
        raise StoreError(f"{str(path)!r} is not a gradwatch store ({error})") from error
    if row is None or json.loads(row[0]) != FORMAT:
        raise StoreError(f"{str(path)!r} is not a gradwatch store (no format marker)")
    return db


def read_meta(db: sqlite3.Connection) -> dict:
    return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}


def read_run(run: str | os.PathLike) -> RunSeries:
    """The series of a run: its main store file, as a `RunSeries`."""
    db = connect(store_files(run)[0])
    try:
        return _read(db)
    finally:
        db.close()


def _read(db: sqlite3.Connection) -> RunSeries:
    meta = read_meta(db)
    layer_rows = db.execute(
        "SELECT id, name, type, idx, role, n_params, activation FROM layers ORDER BY idx, id"
    ).fetchall()
    layers = [LayerInfo(name, typ, idx, role, n, act) for _, name, typ, idx, role, n, act in layer_rows]
    column = {row[0]: i for i, row in enumerate(layer_rows)}
    step_rows = db.execute("SELECT step, loss, lr FROM steps ORDER BY step").fetchall()
    steps = np.array([r[0] for r in step_rows], dtype=np.int64)
    loss = np.array([np.nan if r[1] is None else r[1] for r in step_rows], dtype=float)
    lr = np.array([np.nan if r[2] is None else r[2] for r in step_rows], dtype=float)

    metrics = {c: np.full((len(steps), len(layers)), np.nan) for c in LAYER_COLUMNS}
    column_of = np.full(max(column, default=0) + 1, -1, dtype=np.int64)
    for layer_id, col in column.items():
        column_of[layer_id] = col
    rows = db.execute(f"SELECT step, layer, {', '.join(LAYER_COLUMNS)} FROM layer_stats")
    # in chunks: a whole long run as Python tuples is ~5x its arrays (1.2 GB at 12k steps x 220 layers)
    while chunk := rows.fetchmany(READ_CHUNK_ROWS):
        arr = np.array(chunk, dtype=float)  # NULL -> nan
        at = np.searchsorted(steps, arr[:, 0].astype(np.int64))
        keep = (at < len(steps)) & (steps[np.minimum(at, len(steps) - 1)] == arr[:, 0])
        arr, at = arr[keep], at[keep]
        cols = column_of[arr[:, 1].astype(np.int64)]
        for j, name in enumerate(LAYER_COLUMNS):
            metrics[name][at, cols] = arr[:, 2 + j]

    profiles: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    name_of = {row[0]: row[1] for row in layer_rows}
    prof = db.execute("SELECT layer, step, t, grad_norm FROM time_profile ORDER BY layer, step, t").fetchall()
    by_layer: dict[str, dict[int, dict[int, float]]] = {}
    for layer_id, step, t, value in prof:
        by_layer.setdefault(name_of[layer_id], {}).setdefault(step, {})[t] = np.nan if value is None else value
    for name, per_step in by_layer.items():
        p_steps = np.array(sorted(per_step), dtype=np.int64)
        width = max(max(d) for d in per_step.values()) + 1
        table = np.full((len(p_steps), width), np.nan)
        for i, s in enumerate(p_steps):
            for t, v in per_step[int(s)].items():
                table[i, t] = v
        profiles[name] = (p_steps, table)

    events = {}
    for step, kind, detail in db.execute("SELECT step, kind, detail FROM events ORDER BY step"):
        events.setdefault(kind, []).append((step, detail))
    for key, kind in (("skipped_steps", "skipped_step"), ("guard_skipped_steps", "guard_skipped"),
                      ("phase_starts", "new_phase"), ("own_loss_steps", "own_loss")):
        meta[key] = [s for s, _ in events.get(kind, [])]
    # layers whose only optimizer stopped stepping at that step, on purpose (an encoder's warm-up)
    meta["optimizer_stopped"] = [[s, json.loads(d)] for s, d in events.get("optimizer_stopped", [])]
    # layers in no optimizer seen stepping, as last said (they get gradients and never change)
    meta["outside_optimizers"] = json.loads(events["outside_optimizers"][-1][1]) if "outside_optimizers" in events else []
    # one rank's own loss non-finite while the others' were not (docs/distributed.md)
    meta["rank_non_finite"] = [[s, d] for s, d in events.get("rank_non_finite", [])]
    # an exchange across ranks failed: a rank died (or ended on an error) at about that step
    meta["distributed_errors"] = [[s, d] for s, d in events.get("distributed_error", [])]
    return RunSeries(layers, steps, loss, lr, metrics, profiles, meta)
