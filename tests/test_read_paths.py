"""Every kind of path a reader is pointed at: each is read, or refused in one line that says what
is there and what to give instead."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time

import pytest

from gradwatch.errors import StoreError
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter, read_run
from gradwatch.store.reader import LOCK_FILE
from gradwatch.store.schema import DDL, LAYER_COLUMNS

LAYERS = [LayerInfo("fc0", "Linear", 0, "param", 20)]


def store(directory, n_steps=3):
    directory.mkdir(parents=True, exist_ok=True)
    writer = RunStoreWriter(directory / "gradwatch.sqlite")
    rows = [(s, "fc0", 1.0 + s, *[None] * (len(LAYER_COLUMNS) - 1)) for s in range(n_steps)]
    writer.write(FlushBatch(LAYERS, steps=[(s, 1.0, 0.1, "", time.time()) for s in range(n_steps)], layer_rows=rows))
    writer.close()


def test_runs_latest_linked_to_a_deleted_run_names_the_runs_left(tmp_path):
    """`runs/latest` after its run was deleted: "no run at 'runs/latest'", although the user can
    see the link there; it now says where it pointed and which runs are left."""
    runs = tmp_path / "runs"
    store(runs / "20260101-120000")
    store(runs / "20260101-110000")
    os.utime(runs / "20260101-110000", (1, 1))  # the older of the two left
    (runs / "latest").symlink_to("20260101-130000")  # the newer run, deleted since
    with pytest.raises(StoreError) as err:
        read_run(runs / "latest")
    said = str(err.value)
    assert "links to '20260101-130000', which no longer exists" in said
    assert "the runs there: 20260101-120000, 20260101-110000;" in said
    assert f"the newest is {str(runs / '20260101-120000')!r}" in said


def test_the_runs_folder_itself_is_answered_with_runs_latest(tmp_path):
    """`gradwatch show runs`: the example given was the oldest run, and `latest` was listed as a run."""
    runs = tmp_path / "runs"
    for name in ("20260101-120000", "20260101-130000"):
        store(runs / name)
    (runs / "latest").symlink_to("20260101-130000")
    with pytest.raises(StoreError, match=r"holds one run per directory \(20260101-120000, 20260101-130000\): "
                                         r"give one of them, e.g. '.*latest' \(the newest\)"):
        read_run(runs)


def _created_not_written(path):
    """The store as its writer leaves it between creating the file and committing its meta."""
    db = sqlite3.connect(path)
    db.executescript(DDL)
    db.close()


@pytest.mark.parametrize("state", ["empty file", "tables, no meta yet"])
def test_a_store_caught_before_its_first_write_is_no_step_yet_not_not_a_store(tmp_path, state):
    """A reader of a live `gradwatch run` (read every second) caught the store file its command had
    just created: "'RUN/gradwatch.sqlite' is not a gradwatch store (no such table: meta)"."""
    path = tmp_path / "gradwatch.sqlite"
    path.write_bytes(b"") if state == "empty file" else _created_not_written(path)
    with pytest.raises(StoreError, match="is empty: the process writing it has stored no step yet|not a gradwatch"):
        read_run(path)
    if state == "empty file":  # no lock beside it: a `gw.watch(out=...)` store
        with pytest.raises(StoreError, match="is empty: the process writing it has stored no step yet"):
            read_run(path)
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `gradwatch run` holds it while the run lives
        for given in (tmp_path, path):
            with pytest.raises(StoreError, match="is a live `gradwatch run` whose command has stored no training "
                                                 "step yet"):
                read_run(given)
    finally:
        os.close(fd)
    with pytest.raises(StoreError, match="directory whose command stored no training step: .* killed before"):
        read_run(tmp_path)  # the command died there


def test_a_sqlite_file_of_another_tool_is_still_not_a_gradwatch_store(tmp_path):
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="is not a gradwatch store"):
        read_run(path)


def test_a_store_with_its_last_steps_in_a_log_it_cannot_index_says_to_copy_it(tmp_path, monkeypatch):
    """A killed run's store, its steps still in `gradwatch.sqlite-wal`, in a read-only directory
    without the `-shm` index SQLite must create to read the log: read as immutable, the file alone,
    it was a run that "stored no training step" (here: 5 steps in the log, none in the file)."""
    import shutil

    import gradwatch.store.reader as reader

    writer = RunStoreWriter(tmp_path / "live.sqlite")  # open: its flush is in the log, as when killed
    writer.write(FlushBatch(LAYERS, steps=[(s, 1.0, 0.1, "", time.time()) for s in range(5)],
                            layer_rows=[(s, "fc0", 1.0, *[None] * (len(LAYER_COLUMNS) - 1)) for s in range(5)]))
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("")
    for suffix in ("", "-wal"):
        shutil.copy(tmp_path / f"live.sqlite{suffix}", run / f"gradwatch.sqlite{suffix}")
    writer.close()
    assert len(read_run(run).steps) == 5  # where SQLite may write, the log is read
    (run / "gradwatch.sqlite-shm").unlink()
    real = sqlite3.connect

    def read_only_directory(database, **kwargs):  # as for a non-root user, where -shm cannot be created
        if "mode=ro" in database:
            raise sqlite3.OperationalError("unable to open database file")
        return real(database, **kwargs)

    monkeypatch.setattr(reader.sqlite3, "connect", read_only_directory)
    with pytest.raises(StoreError, match=r"keeps its last steps in gradwatch.sqlite-wal \([\d,]+ bytes\), which "
                                         r"SQLite reads only where it may create gradwatch.sqlite-shm .* copy the run"):
        read_run(run)


@pytest.mark.parametrize("command", ["show", "diagnose"])
def test_a_run_of_several_stores_says_which_one_is_shown(tmp_path, command):
    """`all_ranks=True` under torchrun: every rank's store in RUN, and `show RUN` showed rank 0's
    without a word."""
    import contextlib
    import io

    from gradwatch.cli.main import main

    for rank, n_steps in ((0, 3), (1, 5)):
        store(tmp_path / f"r{rank}", n_steps)
        (tmp_path / f"r{rank}" / "gradwatch.sqlite").rename(tmp_path / f"gradwatch-rank{rank}.sqlite")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main([command, str(tmp_path)]) == 0
    assert err.getvalue() == (f"gradwatch: {tmp_path} holds 2 stores: showing gradwatch-rank0.sqlite; give another's "
                              f"file to see it, e.g. {tmp_path / 'gradwatch-rank1.sqlite'}\n")
    assert command == "diagnose" or f"{tmp_path}: 3 steps" in out.getvalue()  # rank 0's


def test_a_store_of_a_newer_schema_asks_for_a_newer_gradwatch(tmp_path):
    """Its tables may differ: read as ours, a renamed column was "damaged (no such column: ...)"."""
    store(tmp_path)
    db = sqlite3.connect(tmp_path / "gradwatch.sqlite")
    with db:
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        db.execute("ALTER TABLE layer_stats RENAME COLUMN grad_max TO grad_absmax")
    db.close()
    with pytest.raises(StoreError, match=r"was written by a newer gradwatch \(store schema 2; this one reads 1\): "
                                         r"upgrade gradwatch"):
        read_run(tmp_path)
