"""Reading a run back as numpy series (`read_run`), from a run directory or a store file."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import quote

import numpy as np

from gradwatch.errors import ConfigError, StoreError
from gradwatch.store.schema import FORMAT, LAYER_COLUMNS, SCHEMA_VERSION
from gradwatch.store.rows import RowsBuilder
from gradwatch.store.series import LayerInfo, RunSeries

try:
    import fcntl
except ImportError:  # Windows: a live run cannot be told from a finished one
    fcntl = None

STORE_NAME = "gradwatch.sqlite"
LOCK_FILE = ".gradwatch.lock"  # locked by `gradwatch run` and its command while the run lives
# why `gradwatch run` ended with no store (its exit code, torch never imported): said again by a
# later `gradwatch diagnose runs/latest`, which could only guess (a script's syntax error read as
# "trained no torch model, or killed before its first store write")
NOTHING_RECORDED = "nothing_recorded.txt"
LATEST = "latest"  # `runs/latest`: a link to the newest run `gradwatch run` started under runs/
READ_CHUNK_ROWS = 50_000
Progress = Callable[[int, int], None]  # (steps read, steps to read)


def store_files(run: str | os.PathLike) -> list[Path]:
    """The store files of a run directory, the main one first (rank 0, else the first process)."""
    if not isinstance(run, (str, os.PathLike)):
        raise StoreError(f"{run!r}: expected a run directory's path (a str or Path), e.g. 'runs/latest'")
    path = Path(run)
    if path.is_file():
        return [path]
    if not path.exists():
        raise StoreError(_missing(path))
    files = sorted(path.glob("gradwatch*.sqlite"))
    if not files:
        inner = sorted({f.parent.name for f in path.glob("*/gradwatch*.sqlite") if not f.parent.is_symlink()})
        if inner:  # `runs/`, or a callback's distributed run (one directory per rank)
            given = f"{str(path / LATEST)!r} (the newest)" if (path / LATEST).is_dir() else repr(str(path / inner[0]))
            raise StoreError(f"{str(path)!r} holds one run per directory ({_listed(inner)}): give one of them, "
                             f"e.g. {given}")
        if (path / LOCK_FILE).exists():  # made by `gradwatch run`: the run was watched and saw no step
            raise StoreError(_no_step(path))
        raise StoreError(f"{str(path)!r} holds no gradwatch store (gradwatch*.sqlite); was the run watched?")
    preferred = [path / STORE_NAME, path / "gradwatch-rank0.sqlite"]
    head = [f for f in preferred if f in files][:1]
    return head + sorted((f for f in files if f not in head), key=_in_order)


def _in_order(path: Path) -> list:
    """A store file's place: numbers by value, a name before its continuations (gradwatch-pid7,
    -pid7-2, -pid7-10: the stages of a script that re-executes itself; rank2 before rank10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name.removesuffix(".sqlite"))]


def _listed(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "")


def _missing(path: Path) -> str:
    """No run at `path`: said with where the link `runs/latest` pointed when that run was deleted."""
    if not path.is_symlink():
        return f"no run at {str(path)!r}: give a run directory written by `gradwatch run` or a .sqlite store"
    runs = [d for d in path.parent.iterdir() if not d.is_symlink() and any(d.glob("gradwatch*.sqlite"))]
    runs = [d.name for d in sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)]  # the newest first
    there = (f"the runs there: {_listed(runs)}; the newest is {str(path.parent / runs[0])!r}" if runs
             else f"{str(path.parent)!r} holds no other run")
    return f"{str(path)!r} links to {os.readlink(path)!r}, which no longer exists (deleted?); {there}"


def _no_step(path: Path) -> str:
    """A `gradwatch run` directory (its lock file is there) with no stored step yet, or never."""
    if run_is_live(path):
        return (f"{str(path)!r} is a live `gradwatch run` whose command has stored no training step yet: the "
                "first store write comes after --flush-every steps (default 50)")
    if (path / NOTHING_RECORDED).is_file():
        return (path / NOTHING_RECORDED).read_text().strip()
    return (f"{str(path)!r} is a `gradwatch run` directory whose command stored no training step: either it "
            "trained no torch model (a step is a backward pass and optimizer step), or it was killed before its "
            "first store write (every --flush-every steps)")


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """Open a store read-only and check it is one."""
    path = Path(path)
    uri = f"file:{quote(str(path.absolute()))}"  # quoted: '#', '?' or '%' in a path are a URI's own
    # read-only first; then immutable, for a finished run where nothing can be written (no -shm beside it)
    error: sqlite3.Error | None = None
    for mode in ("mode=ro", "immutable=1"):
        if error is not None and _log_size(path) and "no such table" not in str(error):
            # read-only failed, and immutable would read the file alone, not its log
            raise StoreError(_unreadable_log(path, error))
        db = None
        try:
            db = sqlite3.connect(f"{uri}?{mode}", uri=True)
            row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            break
        except sqlite3.OperationalError as exc:
            _close(db)
            error = exc
        except sqlite3.DatabaseError as exc:
            _close(db)
            if "malformed" in str(exc):  # a store cut short or overwritten: "damaged", not "not a store"
                raise damaged(path, exc) from exc
            raise StoreError(f"{str(path)!r} is not a gradwatch store ({exc})") from exc
    else:
        raise StoreError(_unwritten(path) or f"{str(path)!r} is not a gradwatch store ({error})") from error
    if row is None or json.loads(row[0]) != FORMAT:
        db.close()
        raise StoreError(_unwritten(path) or f"{str(path)!r} is not a gradwatch store (no format marker)")
    version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if version is not None and json.loads(version[0]) > SCHEMA_VERSION:  # its tables may not be ours
        db.close()
        raise StoreError(f"{str(path)!r} was written by a newer gradwatch (store schema {json.loads(version[0])}; "
                         f"this one reads {SCHEMA_VERSION}): upgrade gradwatch to read it")
    return db


def _close(db: sqlite3.Connection | None) -> None:
    if db is not None:
        db.close()


def _log_size(path: Path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except OSError:
        return 0


def _unreadable_log(path: Path, error: Exception) -> str:
    """A store whose last steps are in its write-ahead log (its process was killed), where SQLite may
    not create the log's index (`-shm`): a read-only directory, a copy without it. Read as immutable,
    the file alone showed none of them ("stored no training step"), or silently fewer."""
    return (f"{str(path)!r} keeps its last steps in {path.name}-wal ({_log_size(path):,} bytes), which SQLite "
            f"reads only where it may create {path.name}-shm beside it ({error}): copy the run directory "
            f"somewhere writable (cp -r {str(path.parent)!r} ...) and read the copy")


def _unwritten(path: Path) -> str | None:
    """A store file created but with no flush in it yet: its writer is about to write the first one
    (a reader of a live run caught it there: "not a gradwatch store"), or was killed before."""
    if (path.parent / LOCK_FILE).exists():  # a `gradwatch run` directory
        return _no_step(path.parent)
    if os.path.getsize(path) == 0:
        return (f"{str(path)!r} is empty: the process writing it has stored no step yet (the first store write "
                "comes after flush_every steps), or was killed before it did")
    return None


def read_layers(db: sqlite3.Connection) -> tuple[list[int], list[LayerInfo]]:
    """The store's layers in forward order: their ids (layer_stats' `layer`) and their infos."""
    rows = db.execute("SELECT id, name, type, idx, role, n_params, activation FROM layers ORDER BY idx, id").fetchall()
    return [r[0] for r in rows], [LayerInfo(name, typ, idx, role, n, act) for _, name, typ, idx, role, n, act in rows]


def read_steps(db: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The recorded steps in order, with their loss and lr (NaN where not recorded)."""
    rows = db.execute("SELECT step, loss, lr FROM steps ORDER BY step").fetchall()
    return (np.array([r[0] for r in rows], dtype=np.int64),
            *(np.array([np.nan if r[k] is None else r[k] for r in rows], dtype=float) for k in (1, 2)))


def read_meta(db: sqlite3.Connection) -> dict:
    """The store's meta table, each value decoded from its JSON."""
    return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}


def read_run(run: str | os.PathLike, *, progress: Progress | None = None,
             metrics: Iterable[str] | None = None, compact: bool = False) -> RunSeries:
    """The series of a run: its main store file, as a `RunSeries`. Its meta says how the run
    ended (`exit`, written by `gradwatch run` when the command ended) or that it is still being
    written (`live`): see `end_note`. `progress(done, total)` is called after each chunk of rows
    read, with the steps read so far and the steps to read (a 50k-step x 480-layer store takes
    about two minutes). `metrics`: only these per-layer metrics (default: all), for a reader that
    shows a few: each is a steps x layers array (1.8 GB for all ten at 50k steps x 480 layers), and
    rows with none of them are left in the file; `series.metrics` holds only these. `compact`: each
    metric a `RecordedRows` (only its recorded rows, float32 where exact), read as the same float64
    array: what diagnose and report read (0.4 instead of 1.8 GB at 50k x 480, sampled every 10th)."""
    chosen = _metrics(metrics)
    path = store_files(run)[0]
    db = connect(path)
    try:
        with damaged_store(path):
            series = _read_compact(db, progress, chosen) if compact else _read(db, progress, chosen)
    finally:
        db.close()
    series.meta["live"] = run_is_live(path.parent)
    return series


@contextmanager
def damaged_store(path: str | os.PathLike) -> Iterator[None]:
    """A context in which SQLite finding the file damaged (a page overwritten, a file cut short
    after its first pages) is a `StoreError` naming the file, not a traceback from deep inside."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise damaged(path, exc) from exc


def damaged(path: str | os.PathLike, exc: Exception) -> StoreError:
    return StoreError(f"{os.fspath(path)!r} is damaged ({exc}): SQLite cannot read it whole, so gradwatch "
                      "cannot show a run from it")


def run_is_live(run_dir: str | os.PathLike) -> bool:
    """A `gradwatch run` (or the command it started) still holds the run directory's lock: the
    store is still being written. Tested with a shared lock, released at once: it never blocks
    the run, and a run starting in that instant is refused only if it races this very check."""
    if fcntl is None:
        return False
    try:
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return LAYER_COLUMNS
    chosen = tuple(dict.fromkeys(metrics))
    unknown = [m for m in chosen if m not in LAYER_COLUMNS]
    if unknown or not chosen:
        raise ConfigError(f"metrics={list(chosen)!r}: unknown {', '.join(map(repr, unknown)) or 'none given'}; "
                          f"choose from {', '.join(LAYER_COLUMNS)}")
    return chosen


def _chunks(db: sqlite3.Connection, new: np.ndarray, ids: list[int], metrics: tuple[str, ...],
            progress: Progress | None) -> Iterator[tuple[np.ndarray, ...]]:
    """(steps, columns in `ids`, values per metric) of the layer rows of the steps `new`,
    READ_CHUNK_ROWS at a time, in step order."""
    column_of = np.full(max(ids, default=0) + 1, -1, dtype=np.int64)
    column_of[ids] = np.arange(len(ids))
    # a row with none of the chosen metrics adds nothing (NaN stays NaN): SQLite skips it, not Python
    recorded = " OR ".join(f"{c} IS NOT NULL" for c in metrics)
    rows = db.execute(f"SELECT step, layer, {', '.join(metrics)} FROM layer_stats "
                      f"WHERE step >= ? AND ({recorded}) ORDER BY step, layer", (int(new[0]),))
    # in chunks: a whole long run as Python tuples is ~5x its arrays (1.2 GB at 12k steps x 220 layers)
    while chunk := rows.fetchmany(READ_CHUNK_ROWS):
        arr = np.array(chunk, dtype=float)  # NULL -> nan
        arr = arr[np.isin(arr[:, 0].astype(np.int64), new)]  # steps read before stay as read
        yield arr[:, 0].astype(np.int64), column_of[arr[:, 1].astype(np.int64)], arr[:, 2:]
        if progress is not None:  # rows come in step order (the primary key's)
            progress(int(np.searchsorted(new, chunk[-1][0], side="right")), len(new))
    if progress is not None:  # the last steps may have none of the chosen metrics
        progress(len(new), len(new))


def _profiles(db: sqlite3.Connection, new: np.ndarray) -> dict[int, dict[int, dict[int, float]]]:
    """layer id -> step -> t -> ‖∂L/∂x_t‖ of the steps `new`."""
    fresh, out = set(new.tolist()), {}
    for layer_id, step, t, value in db.execute(
            "SELECT layer, step, t, grad_norm FROM time_profile WHERE step >= ?", (int(new[0]),)):
        if step in fresh:
            out.setdefault(layer_id, {}).setdefault(step, {})[t] = np.nan if value is None else value
    return out


def _read_compact(db: sqlite3.Connection, progress: Progress | None, metrics: tuple[str, ...]) -> RunSeries:
    """A read whose rows no later read extends: each metric's rows copied out of the room reserved."""
    series = StoreFollower(db, progress, metrics).read()
    for rows in series.metrics.values():
        room = rows.values.base
        if room is not None and len(room) > len(rows.values):
            rows.values = rows.values.copy()
    return series


def _read(db: sqlite3.Connection, progress: Progress | None = None,
          metrics: tuple[str, ...] = LAYER_COLUMNS) -> RunSeries:
    series = StoreFollower(db, progress, metrics).read()
    for name, values in series.metrics.items():  # dense, one at a time: each one's rows freed as it is
        series.metrics[name] = np.asarray(values)  # a fresh array, the caller's to change
    return series


class StoreFollower:
    """Reads a store that is still being written, a piece at a time: each `read()` takes the layer
    rows of the steps written since the last call, and only those.

    The live check reads at every tenth of a run's growth; reading the whole store each time was
    ~11 whole reads over a run (a 12k-step x 220-layer store took 15 s a read). Every step's rows
    are written in the transaction that writes its `steps` row, so a step seen there is complete;
    a step can arrive after later ones (one held back for its weight update), and is put in order.
    Each metric is kept as its recorded rows (`RecordedRows`): the sampled ones as dense arrays were
    90% NaN (1.8 GB for ten at 50k steps x 480 layers, in the training process). The series
    returned shares this reader's rows: the next `read()` may add to them.
    """

    def __init__(self, db: sqlite3.Connection, progress: Progress | None = None,
                 metrics: tuple[str, ...] = LAYER_COLUMNS):
        self._db = db
        self._progress = progress
        self._ids: list[int] = []  # layer ids, in the column order of the rows below
        self._steps = np.empty(0, dtype=np.int64)  # every step read, sorted
        self._metrics = {c: RowsBuilder(0) for c in metrics}
        self._profiles: dict[int, dict[int, dict[int, float]]] = {}  # layer id -> step -> t -> value

    def read(self) -> RunSeries:
        """One read transaction: every query sees the same flushes. Read in separate statements, a
        flush committed between the layer query and the rows (a layer first seen in it) put rows of
        a layer not in the list into the arrays: an IndexError, or values in another's column."""
        db = self._db
        own = not db.in_transaction  # the writer's own connection (a live check) holds none here
        if own:
            db.execute("BEGIN")
        try:
            return self._read()
        finally:
            if own and db.in_transaction:
                db.execute("COMMIT")

    def _read(self) -> RunSeries:
        db = self._db
        meta = read_meta(db)
        ids, layers = read_layers(db)
        steps, loss, lr = read_steps(db)
        self._add_layers(ids)
        new = np.setdiff1d(steps, self._steps, assume_unique=True)
        self._steps = steps
        if len(new):
            self._read_rows(new)
        position = {layer_id: i for i, layer_id in enumerate(self._ids)}
        order = [position[layer_id] for layer_id in ids]
        in_order = order == list(range(len(order)))
        metrics = {name: rows.build(steps, None if in_order else order) for name, rows in self._metrics.items()}
        name_of = {layer_id: layer.name for layer_id, layer in zip(ids, layers)}
        profiles = {name_of[layer_id]: _profile_table(per_step) for layer_id, per_step in self._profiles.items()}
        return RunSeries(layers, steps, loss, lr, metrics, profiles, _with_events(db, meta))

    def _add_layers(self, ids: list[int]) -> None:
        """Columns for layers first seen now (a model found later, a module run later)."""
        known = set(self._ids)
        fresh = [i for i in ids if i not in known]
        if fresh:
            self._ids += fresh
            for rows in self._metrics.values():
                rows.add_columns(len(fresh))

    def _read_rows(self, new: np.ndarray) -> None:
        names = list(self._metrics)
        for rows in self._metrics.values():
            rows.reserve(len(self._steps))
        for steps, cols, values in _chunks(self._db, new, self._ids, tuple(names), self._progress):
            for j, name in enumerate(names):
                recorded = ~np.isnan(values[:, j])
                self._metrics[name].add(steps[recorded], cols[recorded], values[recorded, j])
        for layer_id, per_step in _profiles(self._db, new).items():
            mine = self._profiles.setdefault(layer_id, {})
            for step, by_t in per_step.items():
                mine.setdefault(step, {}).update(by_t)


def _profile_table(per_step: dict[int, dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, array (n, T)) of one recurrent layer's ‖∂L/∂x_t‖, NaN where a t was not recorded."""
    p_steps = np.array(sorted(per_step), dtype=np.int64)
    table = np.full((len(p_steps), max(max(d) for d in per_step.values()) + 1), np.nan)
    for i, s in enumerate(p_steps):
        for t, v in per_step[int(s)].items():
            table[i, t] = v
    return p_steps, table


def _with_events(db: sqlite3.Connection, meta: dict) -> dict:
    """The run's meta with what its events say (steps skipped, phases, optimizers stopped...)."""
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
    # gradients clipped after the step that used them: [step, {"function", "where", "limit"}], the first
    meta["late_clip"] = [[s, json.loads(d)] for s, d in events.get("late_clip", [])[:1]]
    # a second backward of the same loss in one step: [step, {"where"}], the first
    meta["repeated_backward"] = [[s, json.loads(d)] for s, d in events.get("repeated_backward", [])[:1]]
    # torch warned that a loss's target broadcasts against its input: [step, {"where", "input", "target"}]
    meta["loss_broadcast"] = [[s, json.loads(d)] for s, d in events.get("loss_broadcast", [])[:1]]
    # findings the live diagnosis said while training: [step, kind, first layer]
    meta["live_findings"] = [[s, *json.loads(d)] for s, d in events.get("live_finding", [])]
    return meta
