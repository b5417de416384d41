"""Partial runs: a store still being written, a run whose command ended early, a store left with its
write-ahead log, a damaged store. Each is read whole or refused in one clear line, and every tool
says when the run it shows is partial."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import sqlite3
import time

import numpy as np
import pytest

from gradwatch.errors import StoreError
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter, end_note, read_run
from gradwatch.store.reader import LOCK_FILE, StoreFollower, connect
from gradwatch.store.schema import LAYER_COLUMNS
from gradwatch.store.writer import finish_store

LAYERS = [LayerInfo("fc0", "Linear", 0, "param", 20), LayerInfo("fc1", "Linear", 1, "param", 5)]


def batch(steps, layers=LAYERS, base=1.0):
    """One flush: every layer at every step, grad_norm = base * (step + 1) * (layer + 1)."""
    rows = [(s, l.name, base * (s + 1) * (i + 1), *[None] * (len(LAYER_COLUMNS) - 1))
            for s in steps for i, l in enumerate(layers)]
    return FlushBatch(layers, steps=[(s, 1.0 / (s + 1), 0.1, "", time.time()) for s in steps], layer_rows=rows)


def written(path, n_steps, flush=10):
    writer = RunStoreWriter(path, {"command": ["train.py"]})
    for first in range(0, n_steps, flush):
        writer.write(batch(list(range(first, min(first + flush, n_steps)))))
    return writer


def cli(*args):
    from gradwatch.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_a_store_left_with_its_log_is_folded_into_one_file_that_copies_whole(tmp_path):
    """A script stopped by SIGTERM, Ctrl-C, sys.exit or os._exit left its last steps in
    gradwatch.sqlite-wal: copied alone (the store is documented as one file), a 54,388-step run
    read 52,000 steps, a 121-step one "not a gradwatch store". `gradwatch run` now records how the
    command ended and folds the log into the file."""
    live = tmp_path / "live"
    live.mkdir()
    writer = written(live / "gradwatch.sqlite", 30)
    dead = tmp_path / "dead"  # what a process that died with its connection open leaves behind
    dead.mkdir()
    for suffix in ("", "-wal"):
        shutil.copy(live / f"gradwatch.sqlite{suffix}", dead / f"gradwatch.sqlite{suffix}")
    writer.close()
    assert (dead / "gradwatch.sqlite-wal").stat().st_size > 0
    finish_store(dead / "gradwatch.sqlite", 143)
    assert not (dead / "gradwatch.sqlite-wal").exists()
    alone = tmp_path / "copied.sqlite"
    shutil.copy(dead / "gradwatch.sqlite", alone)  # the file alone, as a user copies a run
    run = read_run(alone)
    assert list(run.steps) == list(range(30))
    np.testing.assert_array_equal(run.metrics["grad_norm"][:, 1], 2.0 * (np.arange(30) + 1))
    assert run.meta["exit"] == {"code": 143}
    assert end_note(run.meta, 29) == "stopped by SIGTERM at step 29; every step until then is stored"


def test_how_the_run_ended_is_said_and_forgotten_by_a_training_that_continues_it(tmp_path):
    path = tmp_path / "gradwatch.sqlite"
    written(path, 12).close()
    finish_store(path, 137)
    run = read_run(tmp_path)
    assert end_note(run.meta, int(run.steps[-1])) == ("killed by SIGKILL (out of memory?) after step 11: "
                                                      "the steps after its last store write are lost")
    finish_store(path, 129)  # a closed terminal: not handled, as SIGTERM and SIGINT are
    assert end_note(read_run(tmp_path).meta, 11) == ("killed by SIGHUP after step 11: the steps after its last "
                                                     "store write are lost")
    finish_store(path, 130)
    assert end_note(read_run(tmp_path).meta, 11) == "stopped by Ctrl-C (SIGINT) at step 11; every step until then is stored"
    finish_store(path, 3)
    assert end_note(read_run(tmp_path).meta, 11) == "the command ended with exit code 3 at step 11; every step until then is stored"
    finish_store(path, 0)
    assert end_note(read_run(tmp_path).meta, 11) is None
    finish_store(path, 137)
    resumed = RunStoreWriter(path, resume_at=12)  # a resumed training: the earlier end is not its own
    run = read_run(tmp_path)
    assert "exit" not in run.meta and "closed" not in run.meta and len(run.steps) == 12
    assert end_note(run.meta, 11).startswith("its end was never recorded")  # until its own `gradwatch run` ends
    # ... or its own process closes the store: a tester killed `gradwatch run` alone (kill -9), its
    # command ran on to its last step and closed the store, and the run read "killed ... steps lost"
    resumed.mark_closed()  # (what the watched process does as it ends: exit_signals.store_last_steps)
    resumed.close()
    assert end_note(read_run(tmp_path).meta, 11) is None


def test_a_run_still_being_written_is_said_to_be_partial(tmp_path):
    """`gradwatch show/diagnose/report` on a live run showed its steps as if the run were whole."""
    written(tmp_path / "gradwatch.sqlite", 20).close()
    assert read_run(tmp_path).meta["live"] is False
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `gradwatch run` holds it while the run lives
        run = read_run(tmp_path)
        assert run.meta["live"] is True
        code, out, _ = cli("show", tmp_path, "--metric", "grad_norm")
        assert code == 0 and "20 steps (partial)" in " ".join(out.split())
        assert out.splitlines()[-1] == "partial run: still being written: stored up to step 19 so far"
        code, out, _ = cli("diagnose", tmp_path)
        assert code == 0 and out.startswith("partial run: still being written")
        code, out, err = cli("diagnose", tmp_path, "--json")
        assert code == 0 and out.startswith("[") and "partial run: still being written" in err
        from gradwatch.report import render_html

        page = render_html(run, findings=[])
        assert '<p class="partial"><b>Partial run:</b> still being written: stored up to step 19 so far.' in page
        # the lock is never held by the reader: the run keeps it, and a run starting later is refused
        with pytest.raises(BlockingIOError):
            fcntl.flock(os.open(tmp_path / LOCK_FILE, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert read_run(tmp_path).meta["live"] is False


def test_the_report_says_how_a_run_ended(tmp_path):
    from gradwatch.report import render_html

    written(tmp_path / "gradwatch.sqlite", 15).close()
    finish_store(tmp_path / "gradwatch.sqlite", 137)
    page = render_html(tmp_path, findings=[])
    assert "<b>Partial run:</b> killed by SIGKILL (out of memory?) after step 14" in page
    assert "<td>ended</td>" in page and "<td>exit</td>" not in page and "<td>live</td>" not in page
    finish_store(tmp_path / "gradwatch.sqlite", 0)
    page = render_html(tmp_path, findings=[])
    assert "Partial run" not in page and "<td>normally (exit code 0)</td>" in page


def test_a_run_directory_that_recorded_no_step_says_so(tmp_path):
    """A script that never trains, under `gradwatch run`: "holds no gradwatch store; was the run
    watched?" although it was."""
    (tmp_path / LOCK_FILE).write_text("123")
    with pytest.raises(StoreError, match="is a `gradwatch run` directory whose command stored no training step: "
                                         "either it trained no torch model .* or it was killed before its first"):
        read_run(tmp_path)
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match="is a live `gradwatch run` whose command has stored no training step "
                                             "yet: the first store write comes after --flush-every steps"):
            read_run(tmp_path)
    finally:
        os.close(fd)


def test_the_run_summary_of_a_run_killed_before_its_first_store_write(tmp_path):
    """Killed by SIGKILL at step 20 of a --flush-every 50 run, `gradwatch run` said "no training
    step was seen" beside "the steps after its last store write are lost"."""
    from gradwatch.cli.summary import print_run_summary

    (tmp_path / LOCK_FILE).write_text("123")
    out = io.StringIO()
    print_run_summary(tmp_path, out, exit_code=137)
    assert out.getvalue() == f"gradwatch: nothing was stored in {tmp_path}\n"


@pytest.mark.parametrize("damage", ["overwritten", "cut short"])
def test_a_damaged_store_is_one_clear_line_in_every_tool(tmp_path, damage):
    """A page overwritten in the middle of the store: `show`, `diagnose`, `report` and `export`
    ended in a traceback from inside sqlite3 ("database disk image is malformed")."""
    path = tmp_path / "gradwatch.sqlite"
    written(path, 400, flush=100).close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if damage == "overwritten":
            f.seek(size // 2)
            f.write(b"\xff" * 8192)
        else:
            f.truncate(8192)
    for args in (["show", tmp_path], ["diagnose", tmp_path], ["report", tmp_path, "-o", tmp_path / "r.html"],
                 ["export", tmp_path, "--tensorboard", tmp_path / "tb"]):
        if args[0] == "export":
            pytest.importorskip("tensorboard")
        code, _, err = cli(*args)
        assert code == 2, (args, err)
        assert f"{str(path)!r} is damaged (database disk image is malformed)" in err, (args, err)


class _FlushBetweenQueries:
    """A reader's connection at which a flush lands right after the layer query (a race)."""

    def __init__(self, db, flush):
        self._db, self._flush = db, flush

    @property
    def in_transaction(self):
        return self._db.in_transaction

    def execute(self, sql, *args):
        cursor = self._db.execute(sql, *args)
        if sql.startswith("SELECT id, name, type") and self._flush:
            rows, flush = cursor.fetchall(), self._flush
            self._flush = None
            flush()
            return _Rows(rows)
        return cursor


class _Rows(list):
    def fetchall(self):
        return list(self)


def test_a_reader_sees_each_flush_whole_when_a_new_layer_lands_during_its_read(tmp_path):
    """A flush committed between the reader's queries, bringing a layer first seen then: its rows
    had no column (IndexError) or went into another layer's. One read transaction now."""
    path = tmp_path / "gradwatch.sqlite"
    writer = written(path, 10)
    late = LAYERS + [LayerInfo("head", "Linear", 2, "param", 3)]
    db = connect(path)
    reader = StoreFollower(_FlushBetweenQueries(db, lambda: writer.write(batch(list(range(10, 20)), late))))
    run = reader.read()
    assert list(run.steps) == list(range(10)) and [l.name for l in run.layers] == ["fc0", "fc1"]
    np.testing.assert_array_equal(run.metrics["grad_norm"][:, 1], 2.0 * (np.arange(10) + 1))
    run = reader.read()  # the next read takes the later flush, new layer and all
    assert list(run.steps) == list(range(20)) and [l.name for l in run.layers] == ["fc0", "fc1", "head"]
    np.testing.assert_array_equal(run.metrics["grad_norm"][10:, 2], 3.0 * (np.arange(10, 20) + 1))
    assert np.isnan(run.metrics["grad_norm"][:10, 2]).all()
    db.close()
    writer.close()


def test_a_gradwatch_run_store_with_no_end_and_no_lock_was_killed_with_its_command(tmp_path):
    """`gradwatch run` killed with its process group records no end: that store is partial; one
    written by gw.watch, or a callback (its framework named), has no end to record."""
    zero_code = tmp_path / "zero"
    zero_code.mkdir()
    writer = RunStoreWriter(zero_code / "gradwatch.sqlite", meta={"command": ["train.py"], "pid": 1})
    writer.write(FlushBatch(layers=[LayerInfo("fc", "Linear", 0, "weight", 2)], steps=[(0, 1.0, 0.1, "", 0.0)]))
    # (killed with it: its writer never closed the store)
    assert end_note(read_run(zero_code).meta, 0) == (
        "its end was never recorded: `gradwatch run` was killed with its command (SIGKILL, or the machine "
        "stopped) after step 0; the steps after its last store write are lost")
    writer.close()
    finish_store(zero_code / "gradwatch.sqlite", 0)
    assert end_note(read_run(zero_code).meta, 0) is None
    for meta in ({"command": ["fit.py"], "framework": "lightning"}, {}):
        assert end_note(meta, 0) is None


def test_the_watched_process_says_it_ended_as_it_should_and_not_when_it_raised(tmp_path):
    """What lets a run read whole when `gradwatch run` was killed alone: the command's own process
    marks its store closed at its normal end, not at an uncaught error."""
    from test_cli_run import gradwatch

    script = tmp_path / "t.py"
    body = ("import torch\nm = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "lf = torch.nn.MSELoss()\n"
            "for _ in range(3):\n    opt.zero_grad(); lf(m(torch.ones(4, 2)), torch.zeros(4, 1)).backward(); opt.step()\n")
    for name, tail, closed in (("ok", "", True), ("raised", "raise RuntimeError('after training')\n", False)):
        script.write_text(body + tail)
        gradwatch("run", "--out", tmp_path / name, script)
        meta = read_run(tmp_path / name).meta
        assert bool(meta.get("closed")) == closed and meta["exit"]["code"] == (0 if closed else 1)
        assert meta["models"] == [""]  # (the loss module it calls, no parameters, is no model: a report listed it)
