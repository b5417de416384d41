"""`gradwatch show` streams each layer's first, last, lowest and highest value from the store: the
same numbers as `read_run`'s arrays give, without holding ten steps x layers arrays (1.9 GB at 50k
steps x 480 layers)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import gradwatch.store.reader as reader
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter, read_run
from gradwatch.store.schema import LAYER_COLUMNS

LAYERS = [LayerInfo(f"l{i}", "Linear", 3 - i, "param", 10) for i in range(4)]  # ids not in forward order


def value(rng, s, i, j):
    """Random values with gaps (NaN: not recorded), non-finite ones (the store keeps NaN as +inf),
    and a layer whose update_ratio is never finite and whose nonfinite is never recorded."""
    if i == 3 and j == 4:
        return None
    if i == 3 and j == 3:
        return float("inf")
    r = rng.random()
    return None if r < 0.3 else float("inf") if r < 0.4 else float(rng.normal())


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    writer = RunStoreWriter(tmp_path / "gradwatch.sqlite")
    for steps in ([0, 1, 2], [3, 4, 6], [5, 7, 8, 9]):  # step 5 held back, written after step 6
        rows = [(s, l.name, *[value(rng, s, i, j) for j in range(len(LAYER_COLUMNS))])
                for s in steps for i, l in enumerate(LAYERS)]
        writer.write(FlushBatch(LAYERS, steps=[(s, float(rng.normal()), 0.1, "", time.time()) for s in steps],
                                layer_rows=rows))
    writer.close()
    return tmp_path


@pytest.mark.parametrize("chunk", [5, 50_000])  # chunks that end inside a step, and one chunk
def test_the_streamed_summary_is_what_the_arrays_give(run_dir, monkeypatch, chunk):
    from gradwatch.store.summary import summarise

    monkeypatch.setattr(reader, "READ_CHUNK_ROWS", chunk)
    whole = read_run(run_dir)
    summary = summarise(run_dir, LAYER_COLUMNS)
    assert summary.layers == whole.layers
    np.testing.assert_array_equal(summary.steps, whole.steps)
    np.testing.assert_array_equal(summary.loss, whole.loss)
    assert summary.meta == whole.meta
    for metric in LAYER_COLUMNS:
        for i, layer in enumerate(whole.layers):
            _, v = whole.series(layer.name, metric)
            finite = v[np.isfinite(v)]
            expected = [v[0], v[-1]] if len(v) else [np.nan, np.nan]
            expected += [finite.min(), finite.max()] if len(finite) else [np.nan, np.nan]
            np.testing.assert_array_equal(summary.values[metric][i], expected, err_msg=f"{layer.name} {metric}")
    assert np.isinf(summary.values["update_ratio"][0, 0])  # l3 (first in forward order): never finite
    assert np.isnan(summary.values["update_ratio"][0, 2:]).all()
    assert np.isnan(summary.values["nonfinite"][0]).all()  # never recorded


def _store(path, n_steps, n_layers):
    layers = [LayerInfo(f"l{i}", "Linear", i, "param", 10) for i in range(n_layers)]
    writer = RunStoreWriter(path / "gradwatch.sqlite")
    steps = range(n_steps)
    rows = [(s, l.name, *[float(s + i)] * len(LAYER_COLUMNS)) for s in steps for i, l in enumerate(layers)]
    writer.write(FlushBatch(layers, steps=[(s, 1.0, 0.1, "", time.time()) for s in steps], layer_rows=rows))
    writer.close()
    return path


def test_show_holds_no_steps_x_layers_arrays(tmp_path, monkeypatch):
    """`gradwatch show` of a 50k-step x 480-layer store peaked at 1.9 GB (`read_run`'s ten arrays)."""
    import contextlib
    import io
    import tracemalloc

    from gradwatch.cli.main import main

    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    runs = [_store(tmp_path / "small", 2, 2), _store(tmp_path / "big", 5000, 10)]
    arrays = len(LAYER_COLUMNS) * 5000 * 10 * 8  # what read_run holds: 4 MB
    monkeypatch.setattr(reader, "READ_CHUNK_ROWS", 1000)
    for run in runs:  # the small one first, so what show imports is not counted
        out = io.StringIO()
        tracemalloc.start()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                assert main(["show", str(run)]) == 0
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < arrays / 2, peak  # read_run's arrays alone are 1x
    assert "│ l9  " in out.getvalue()


def test_a_column_is_found_by_name_after_the_layers_change():
    """`RunSeries.column` keeps a name index: renamed, reordered or replaced layers are still found,
    the first of two equal names wins, and a name no layer has is a KeyError."""
    from gradwatch.store.reader import LayerInfo
    from gradwatch.store.series import RunSeries

    a, b = LayerInfo("a", "Linear", 0, "param", 4), LayerInfo("b", "Linear", 1, "param", 4)
    run = RunSeries([a, b], np.arange(2), np.zeros(2), np.zeros(2), {})
    assert (run.column("a"), run.column("b")) == (0, 1)
    run.layers.reverse()  # in place
    assert (run.column("a"), run.column("b")) == (1, 0)
    run.layers[0] = LayerInfo("c", "Linear", 1, "param", 4)  # renamed in place
    assert run.column("c") == 0
    with pytest.raises(KeyError):
        run.column("b")
    run.layers = [a, b, LayerInfo("a", "Linear", 2, "param", 4)]  # replaced; a name twice
    assert run.column("a") == 0 and run.column("b") == 1
