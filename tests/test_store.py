"""The store: crash safety, reader errors, schema."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradwatch.errors import StoreError
from gradwatch.store import read_run

SCRIPTS = Path(__file__).parent / "scripts"


def test_sigkill_mid_training_leaves_every_flushed_step_whole(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "killme.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # let it flush a few times, then kill it at an arbitrary moment
        if int(line) >= 60:
            break
    time.sleep(0.013)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    series = read_run(tmp_path)
    assert len(series.steps) >= 50 and len(series.steps) % 5 == 0  # whole flushes only
    assert list(series.steps) == list(range(len(series.steps)))
    grad = series.metrics["grad_norm"][:, [series.column(n) for n in series.layer_names("param")]]
    assert np.isfinite(grad).all()  # every flushed step has every layer
    assert np.isfinite(series.loss).all()


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(StoreError, match="no run at"):
        read_run(tmp_path / "missing")
    with pytest.raises(StoreError, match="holds no gradwatch store"):
        read_run(tmp_path)
    for rank in ("rank0", "rank1"):  # a callback's distributed run: one directory per rank
        (tmp_path / "cb" / rank).mkdir(parents=True)
        (tmp_path / "cb" / rank / "gradwatch.sqlite").write_text("")
    with pytest.raises(StoreError, match="holds one run per directory \\(rank0, rank1\\): give one of them"):
        read_run(tmp_path / "cb")
    bogus = tmp_path / "gradwatch.sqlite"
    bogus.write_text("not a database at all")
    with pytest.raises(StoreError, match="not a gradwatch store"):
        read_run(tmp_path)
    bogus.unlink()
    sqlite3.connect(bogus).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(StoreError, match="not a gradwatch store"):
        read_run(bogus)
    for wrong in (123, None):  # (a TypeError from deep inside pathlib before)
        with pytest.raises(StoreError, match="expected a run directory's path"):
            read_run(wrong)
    from gradwatch.collect.watch import Watch
    from gradwatch.errors import ConfigError
    with pytest.raises(ConfigError, match=r"out=123: expected a directory path"):
        Watch(None, out=123)


def test_store_is_plain_sql(tmp_path):
    import torch
    from torch import nn

    import gradwatch

    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with gradwatch.watch(model, out=tmp_path) as watch:
        for _ in range(3):
            model(torch.randn(4, 2)).sum().backward()
    db = sqlite3.connect(tmp_path / "gradwatch.sqlite")
    rows = db.execute(
        "SELECT s.step, l.name, s.grad_norm FROM layer_stats s JOIN layers l ON l.id = s.layer "
        "WHERE l.role = 'param' ORDER BY s.step, l.idx"
    ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(s, n) for s in range(3) for n in ("0", "2")]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_watching_into_a_used_directory_replaces_the_old_run(tmp_path):
    import torch
    from torch import nn

    import gradwatch as gw

    for steps in (5, 3):
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gw.watch(model, opt, out=tmp_path, warn=False):
            for _ in range(steps):
                opt.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                opt.step()
    assert list(gw.read_run(tmp_path).steps) == [0, 1, 2]


def test_a_watch_from_first_step_continues_the_run_stored_there(tmp_path):
    """A training resumed at step N (the integrations pass the trainer's global step) keeps the
    stored steps before N, under the same layers, and replaces those from N on."""
    import torch
    from torch import nn

    import gradwatch as gw

    def train(model, steps, **kwargs):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gw.Watch(model, opt, out=tmp_path, warn=False, status=False, flush_every=2, **kwargs) as watch:
            for _ in range(steps):
                opt.zero_grad()
                model(torch.randn(4, 3)).sum().backward()
                opt.step()
        return watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    train(model, 6)
    first = gw.read_run(tmp_path)
    model.append(nn.Linear(1, 1))  # a layer the first part did not have
    assert train(model, 3, first_step=4).step == 7
    run = gw.read_run(tmp_path)
    assert list(run.steps) == list(range(7))
    np.testing.assert_array_equal(run.series("0", "grad_norm")[1][:4], first.series("0", "grad_norm")[1][:4])
    new = run.metrics["grad_norm"][:, run.column("3")]
    assert not np.isfinite(new[:4]).any() and np.isfinite(new[4:]).all()
    assert not (run.series("0", "grad_norm")[1][4:6] == first.series("0", "grad_norm")[1][4:]).any()  # replaced
    with pytest.raises(gw.ConfigError, match="first_step=-1"):
        gw.Watch(model, first_step=-1)


def test_runs_under_paths_with_uri_characters_are_read(tmp_path):
    """'#', '?' and '%' in a run's path cut the URI the reader opened ('no such table: meta')."""
    import torch
    from torch import nn

    import gradwatch as gw
    from gradwatch.store import read_run

    for name in ("trial#3", "what?", "p%41"):
        model = nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gw.watch(model, opt, out=tmp_path / name, warn=False) as watch:
            for _ in range(3):
                opt.zero_grad(), model(torch.randn(4, 2)).sum().backward(), opt.step()
            watch.flush()
            assert list(read_run(tmp_path / name).steps) == [0, 1, 2]


def test_a_store_read_in_chunks_is_what_was_written(tmp_path, monkeypatch):
    """The reader takes layer rows a chunk at a time (a long run whole as Python tuples was 1.2 GB):
    values land at their step and layer however the chunks fall, holes stay NaN."""
    from gradwatch.store import FlushBatch, RunStoreWriter, reader
    from gradwatch.store.schema import LAYER_COLUMNS
    from gradwatch.store.series import LayerInfo

    rng = np.random.default_rng(0)
    layers = [LayerInfo(f"l{i}", "Linear", i, "param", 4) for i in range(3)]
    values = rng.standard_normal((6, 3, len(LAYER_COLUMNS)))
    values[rng.random(values.shape) < 0.3] = np.nan
    writer = RunStoreWriter(tmp_path / "gradwatch.sqlite")
    batch = FlushBatch(layers=layers)
    for s in range(6):
        batch.steps.append((s, float(s), 0.1, "[]", 0.0))
        batch.layer_rows += [(s, f"l{i}", *[None if np.isnan(v) else float(v) for v in values[s, i]])
                             for i in range(3)]
    writer.write(batch)
    writer.close()
    for chunk in (1, 4, 1000):
        monkeypatch.setattr(reader, "READ_CHUNK_ROWS", chunk)
        run = read_run(tmp_path)
        for j, name in enumerate(LAYER_COLUMNS):
            np.testing.assert_array_equal(run.metrics[name], values[:, :, j])


def test_a_store_followed_while_written_reads_as_a_fresh_read(tmp_path):
    """The live check reads only the steps written since its last read: after every flush, what it
    holds equals a whole read, with a step held back to a later flush put in its place and a layer
    first seen late given its column."""
    from gradwatch.store import FlushBatch, RunStoreWriter
    from gradwatch.store.reader import StoreFollower
    from gradwatch.store.schema import LAYER_COLUMNS
    from gradwatch.store.series import LayerInfo

    rng = np.random.default_rng(1)
    layers = [LayerInfo(f"l{i}", "Linear", i, "param", 4) for i in range(3)]
    writer = RunStoreWriter(tmp_path / "gradwatch.sqlite")
    follower = StoreFollower(writer.connection)
    flushes = [[0, 1, 2], [4, 5], [3, 6, 7], [], list(range(8, 40))]  # step 3 waited for its update
    for k, flush in enumerate(flushes):
        batch = FlushBatch(layers=layers[:2] if k < 2 else layers)  # l2 first runs in the third flush
        for s in flush:
            batch.steps.append((s, float(rng.random()), 0.1, "[]", 0.0))
            batch.layer_rows += [(s, l.name, *rng.standard_normal(len(LAYER_COLUMNS)).tolist()) for l in batch.layers]
            batch.profile_rows += [(s, "l0", t, float(rng.random())) for t in range(3)]
        writer.write(batch)
        live, whole = follower.read(), read_run(tmp_path)
        assert [l.name for l in live.layers] == [l.name for l in whole.layers]
        np.testing.assert_array_equal(live.steps, whole.steps)
        np.testing.assert_array_equal(live.loss, whole.loss)
        for name in LAYER_COLUMNS:
            np.testing.assert_array_equal(live.metrics[name], whole.metrics[name])
        np.testing.assert_array_equal(live.time_profiles["l0"][1], whole.time_profiles["l0"][1])
    assert list(live.steps) == list(range(40))
    with pytest.raises(TypeError):  # shared with the reader: not the caller's to change
        live.metrics["grad_norm"][0, 0] = 1.0


def test_a_series_holds_exactly_the_stores_per_layer_columns():
    """One list of per-layer metrics, the schema's: a column added to the store is a series too."""
    from gradwatch.store.schema import LAYER_COLUMNS
    from gradwatch.store.series import METRICS
    assert METRICS == LAYER_COLUMNS


def test_a_metric_no_store_records_is_named_as_a_typo_and_one_not_recorded_is_empty():
    from series_builder import build

    run = build(n_steps=10, depth=2)
    with pytest.raises(KeyError, match="no metric named 'gradnorm'; metrics are .*grad_norm"):
        run.series("fc0", "gradnorm")
    del run.metrics["dead"]  # a metric of the schema this run did not record
    steps, values = run.series("fc0", "dead")
    assert len(steps) == len(values) == 0
    assert len(run.series("fc0", "grad_norm")[0]) == 10
