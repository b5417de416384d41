"""`read_run(compact=True)`: each metric kept as its recorded rows (float32 where every value is one),
read as the dense float64 array. What diagnose and report read: a 50k-step x 480-layer run's ten
dense arrays were 1.8 GB. The arrays, every way the rules index them, and the findings must be the
same as the dense read's."""

from __future__ import annotations

import json
import sys
import time
import tracemalloc

import numpy as np
import pytest
from series_builder import build

from gradwatch.diagnose import diagnose
from gradwatch.store import FlushBatch, RunStoreWriter, read_run
from gradwatch.store.rows import RecordedRows
from gradwatch.store.schema import LAYER_COLUMNS
from gradwatch.store.series import RunSeries


def stored(run, path, first_seen=None, events=()):
    """`run` as a store file, 10 steps a flush; a layer in `first_seen` (name -> row) is given to
    the writer only from that row's flush on (a module run later)."""
    writer = RunStoreWriter(path / "gradwatch.sqlite", dict(run.meta))
    first_seen = first_seen or {}
    for first in range(0, len(run.steps), 10):
        layers = [l for l in run.layers if first_seen.get(l.name, 0) <= first]
        batch = FlushBatch(layers, events=[e for e in events if first <= e[0] - run.steps[0] < first + 10])
        for r in range(first, min(first + 10, len(run.steps))):
            batch.steps.append((int(run.steps[r]), float(run.loss[r]), float(run.lr[r]), "", time.time()))
            for c, layer in enumerate(run.layers):
                values = [run.metrics[m][r, c] for m in LAYER_COLUMNS]
                if layer in layers and not np.isnan(values).all():
                    batch.layer_rows.append((int(run.steps[r]), layer.name,
                                             *[None if np.isnan(v) else float(v) for v in values]))
        writer.write(batch)
    writer.close()
    return path


def exploding_with_nan(tmp_path):
    """Gradients that grow, then Inf and a NaN loss; float32 norms, float64 update ratios."""
    run = build(n_steps=80, depth=4, activation="tanh")
    g = run.metrics["grad_norm"]
    g[40:70] *= np.logspace(0, 6, 30)[:, None]
    g[:] = g.astype(np.float32)  # as the collector keeps norms
    g[70:, 0] = np.inf
    g[5, 2] = np.nan  # one layer got no gradient at one step
    run.metrics["nonfinite"][:] = np.where(np.isnan(g), np.nan, 0.0)
    run.metrics["nonfinite"][70:, 0] = 12
    run.metrics["update_ratio"][::10] *= 1 + np.random.default_rng(1).random((8, 7))  # not float32
    run.loss[72:] = np.nan
    run.loss[71] = np.inf
    return stored(run, tmp_path)


def vanishing_late_layer(tmp_path):
    """A deep sigmoid net with a vanishing gradient and a layer first run at step 30."""
    run = build(n_steps=60, depth=6, activation="sigmoid")
    for c in run.weight_columns():
        run.metrics["grad_norm"][:, c] *= 10.0 ** (-6 + run.layers[c].index / 2)
        run.metrics["grad_out_rms"][:, c] *= 10.0 ** (-6 + run.layers[c].index / 2)
    late = run.column("act3")
    for values in run.metrics.values():
        values[:30, late] = np.nan
    run.metrics["saturated"][30::10, late] = 0.99
    return stored(run, tmp_path, first_seen={"act3": 30})


def resumed_plateau(tmp_path):
    """A run resumed at step 1000 whose loss does not move, with a second model from step 1030."""
    run = build(n_steps=60, depth=3, activation="relu")
    run.steps = run.steps + 1000
    run.loss[:] = 2.3 + 1e-4 * np.sin(np.arange(60))
    run.meta["resumed"] = {"at_step": 1000, "optimizer": "Adam"}
    return stored(run, tmp_path, events=[(1030, "new_phase", "{}")])


SCENARIOS = [exploding_with_nan, vanishing_late_layer, resumed_plateau]


def as_json(findings):
    return json.loads(json.dumps([f.to_dict() for f in findings], default=float))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compact_read_gives_the_dense_reads_findings(tmp_path, scenario):
    path = scenario(tmp_path)
    dense, compact = read_run(path), read_run(path, compact=True)
    found = as_json(diagnose(dense))
    assert found, "the scenario should make findings, or the comparison says nothing"
    assert as_json(diagnose(compact)) == found
    assert as_json(diagnose(path)) == found  # a path is read compact


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compact_arrays_read_as_the_dense_ones_every_way_the_rules_index_them(tmp_path, scenario):
    path = scenario(tmp_path)
    dense, compact = read_run(path), read_run(path, compact=True)
    n, width = dense.metrics["grad_norm"].shape
    rows, cols = np.arange(0, n, 3), [0, width - 1, 1]
    mask = np.arange(n) % 7 == 0
    for name, d in dense.metrics.items():
        c = compact.metrics[name]
        assert isinstance(c, RecordedRows) and c.shape == d.shape and len(c) == len(d)
        same = np.testing.assert_array_equal
        same(np.asarray(c), d)
        same(c[rows][:, cols], d[rows][:, cols])
        same(c[rows, 1], d[rows, 1])
        same(c[:n // 2, width - 1], d[:n // 2, width - 1])
        same(c[mask], d[mask])
        same(c[:, cols], d[:, cols])
        same(c[mask, 1:], d[mask, 1:])
        same(c[rows][:, np.arange(width) % 2 == 0], d[rows][:, np.arange(width) % 2 == 0])
        same(c[5:, np.arange(width) % 2 == 0], d[5:, np.arange(width) % 2 == 0])
        same(c[-1], d[-1])
        same(c[n // 3], d[n // 3])
        assert np.array_equal(c[0, 0], d[0, 0], equal_nan=True)
        same(c[rows, cols[:1] * len(rows)], d[rows, cols[:1] * len(rows)])  # paired index arrays
        same(np.isinf(c), np.isinf(d))
        same(np.isfinite(c).any(axis=1), np.isfinite(d).any(axis=1))
        same(c > 0.5, d > 0.5)
        same(np.nan_to_num(c, nan=0.0), np.nan_to_num(d, nan=0.0))
        same(np.nan_to_num(c, nan=0.0) > 0, np.nan_to_num(d, nan=0.0) > 0)  # kept compact: 0.0 outside
        same(np.nan_to_num(c)[rows][:, cols], np.nan_to_num(d)[rows][:, cols])
        assert isinstance(np.nan_to_num(c), RecordedRows)
        same(np.where(np.isnan(c), 1.0, c), np.where(np.isnan(d), 1.0, d))
        assert np.nansum(c[n - 1]) == np.nansum(d[n - 1])
        with pytest.raises(IndexError):
            c[n]
    for layer in dense.layer_names():
        for name in ("grad_norm", "update_ratio"):
            for a, b in zip(dense.series(layer, name), compact.series(layer, name)):
                np.testing.assert_array_equal(a, b)


def test_a_phase_of_a_compact_read_is_the_dense_reads_phase(tmp_path):
    path = resumed_plateau(tmp_path)
    dense, compact = read_run(path), read_run(path, compact=True)
    for first, stop in ((1000, 1030), (1030, None), (1005, 1017)):
        d, c = dense.between(first, stop), compact.between(first, stop)
        assert c.layers == d.layers
        np.testing.assert_array_equal(c.steps, d.steps)
        for name in d.metrics:
            assert isinstance(c.metrics[name], RecordedRows)
            np.testing.assert_array_equal(np.asarray(c.metrics[name]), d.metrics[name])


def test_a_compact_read_keeps_the_recorded_rows_in_float32_where_exact(tmp_path):
    path = exploding_with_nan(tmp_path)
    dense, compact = read_run(path), read_run(path, compact=True)
    m = compact.metrics
    assert m["grad_norm"].values.dtype == np.float32  # norms are float32: nothing lost
    assert m["update_ratio"].values.dtype == np.float64  # not float32 values: kept whole
    assert len(m["weight_norm"].rows) == len(dense.steps) // 10  # sampled every 10th step
    sampled = np.flatnonzero(~np.isnan(dense.metrics["weight_norm"]).all(axis=1))
    np.testing.assert_array_equal(m["weight_norm"].rows, sampled)
    assert sum(v.nbytes for v in m.values()) < sum(v.nbytes for v in dense.metrics.values()) / 3


def test_reading_fewer_metrics_compact_holds_the_same_values(tmp_path):
    path = vanishing_late_layer(tmp_path)
    dense = read_run(path)
    some = read_run(path, metrics=["saturated", "grad_norm"], compact=True)
    assert set(some.metrics) == {"saturated", "grad_norm"}
    for name in some.metrics:
        np.testing.assert_array_equal(np.asarray(some.metrics[name]), dense.metrics[name])


def test_diagnosing_a_stored_run_holds_a_fraction_of_its_dense_arrays(tmp_path, monkeypatch):
    """What `diagnose(path)` reads and holds through the rules, against the ten dense float64
    arrays it used to hold (sampled every 10th step: 90% of them NaN)."""
    diagnose_module = sys.modules[diagnose.__module__]  # `gradwatch.diagnose` the package, not the function
    run = build(n_steps=200, depth=10, activation="sigmoid")
    for values in run.metrics.values():
        values[:] = values.astype(np.float32)
    path = stored(run, tmp_path)
    held = []
    monkeypatch.setattr(diagnose_module, "read_run", lambda *a, **k: held.append(read_run(*a, **k)) or held[-1])
    diagnose(path)
    kept = sum(v.nbytes for v in held[0].metrics.values())
    assert kept < sum(v.nbytes for v in read_run(path).metrics.values()) / 4


def _total_grad_norm_whole(run, stepped_only=False):
    """`total_grad_norm` as it was, on whole steps x layers arrays: the reference."""
    g = np.asarray(run.metrics["grad_norm"])
    if stepped_only:
        unused = np.zeros(g.shape, dtype=bool)
        names = run.layer_names()
        for name in run.meta.get("outside_optimizers") or []:
            unused[:, names.index(name)] = True
        for step, layers in run.meta.get("optimizer_stopped") or []:
            for name in layers:
                unused[run.steps >= step, names.index(name)] = True
        g = np.where(unused, np.nan, g)
    recorded = ~np.isnan(g)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sqrt(np.square(np.where(recorded, g, 0.0)).sum(axis=1))
    total[~recorded.any(axis=1)] = np.nan
    return total


@pytest.mark.parametrize("stepped_only", [False, True])
def test_the_total_norm_by_blocks_of_rows_is_the_whole_arrays_bit_for_bit(monkeypatch, stepped_only):
    from gradwatch.diagnose import signals

    monkeypatch.setattr(signals, "TOTAL_BLOCK", 7)  # blocks that split the run unevenly
    run = build(n_steps=50, depth=4)
    g = run.metrics["grad_norm"]
    g[:] *= np.random.default_rng(2).lognormal(0, 3, g.shape)
    g[10, 0], g[11, 2], g[12] = np.inf, np.nan, np.nan  # an Inf, a layer without, a step without
    g[13, 0] = 1e200  # squares to inf
    run.meta.update(outside_optimizers=["fc3"], optimizer_stopped=[[20, ["fc0"]], [35, ["fc0", "fc1"]]])
    compact = RecordedRows(len(g), np.arange(len(g))[~np.isnan(g).all(axis=1)], g[~np.isnan(g).all(axis=1)])
    want = _total_grad_norm_whole(run, stepped_only)
    np.testing.assert_array_equal(signals.total_grad_norm(run, stepped_only), want)
    run.metrics["grad_norm"] = compact
    np.testing.assert_array_equal(signals.total_grad_norm(run, stepped_only), want)
    assert np.isinf(want[10]) and np.isnan(want[12])


def test_the_total_norm_holds_blocks_of_rows_not_whole_arrays():
    """Whole, its temporaries were four steps x layers arrays at once (0.8 GB at 50k x 480)."""
    from gradwatch.diagnose import signals

    layers = build(n_steps=1, depth=30).layers
    g = np.random.default_rng(0).random((60_000, len(layers)))
    run = RunSeries(layers, np.arange(len(g)), np.ones(len(g)), np.ones(len(g)), {"grad_norm": g},
                    meta={"outside_optimizers": ["fc0"]})
    dense = g.nbytes
    tracemalloc.start()
    try:
        signals.total_grad_norm(run, stepped_only=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < dense / 3  # measured: 3.25x the array whole, 0.2x by blocks


@pytest.mark.parametrize("options", [{}, {"nan": 0.1}, {"posinf": 5.0, "neginf": -2.0}])
def test_nan_to_num_of_a_compact_metric_is_the_dense_ones(options):
    """Kept compact (the non-finite rule's `np.nan_to_num(nonfinite) > 0` was two dense float64
    arrays at once), in float32 only where that gives the same numbers: no ±inf among them."""
    for values in (np.array([[1.5, np.nan], [np.nan, 3.0]], dtype=np.float32),
                   np.array([[1.5, np.inf], [np.nan, -np.inf]], dtype=np.float32),
                   np.array([[1e-300, np.nan], [2.0, 3.0]])):
        kept = RecordedRows(5, np.array([1, 3]), values)
        got, want = np.nan_to_num(kept, **options), np.nan_to_num(np.asarray(kept), **options)
        assert isinstance(got, RecordedRows)
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(got > 0, want > 0)


def test_the_report_reads_compact_and_draws_the_same_page(tmp_path):
    from gradwatch.report import read_series, render_html

    path = exploding_with_nan(tmp_path)
    assert all(isinstance(m, RecordedRows) for m in read_series(path, None).metrics.values())
    dense = read_run(path)
    findings = diagnose(dense)
    assert render_html(path, title="run") == render_html(dense, findings=findings, title="run")
