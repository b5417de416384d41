"""Reading only the metrics a tool shows: `show --metric`, and the report of a run whose findings are
at hand. Each of the ten per-layer metrics is a steps x layers array (1.8 GB for all ten at 50k steps
x 480 layers); what is shown is the same as from a whole read."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest
from series_builder import build

from gradwatch.cli.main import main
from gradwatch.diagnose import diagnose
from gradwatch.diagnose.finding import write_findings
from gradwatch.errors import ConfigError
from gradwatch.report import read_series, render_html, saved_findings
from gradwatch.report.page import DRAWN_METRICS
from gradwatch.store import FlushBatch, RunStoreWriter, read_run
from gradwatch.store.schema import LAYER_COLUMNS


def stored(run, path):
    """`run` (a hand-built series) as a store file, flushed 10 steps at a time."""
    writer = RunStoreWriter(path / "gradwatch.sqlite", {"optimizer": "SGD", "sample_every": 10})
    names = [l.name for l in run.layers]
    for first in range(0, len(run.steps), 10):
        batch = FlushBatch(run.layers)
        for r in range(first, min(first + 10, len(run.steps))):
            batch.steps.append((int(run.steps[r]), float(run.loss[r]), float(run.lr[r]), "", time.time()))
            for c, name in enumerate(names):
                values = [run.metrics[m][r, c] for m in LAYER_COLUMNS]
                if not np.isnan(values).all():
                    cells = [None if np.isnan(v) else float(v) for v in values]
                    batch.layer_rows.append((int(run.steps[r]), name, *cells))
        writer.write(batch)
    writer.close()
    return path


@pytest.fixture
def run_dir(tmp_path):
    run = build(n_steps=60, depth=4, activation="sigmoid")
    run.metrics["act_mean"][50, 1] = np.inf  # outputs blew up once: the page shows the last finite step
    run.metrics["grad_norm"][59, 0] = np.inf  # its last value: shown as non-finite
    return stored(run, tmp_path)


def test_a_run_read_for_some_metrics_holds_exactly_those_values(run_dir):
    whole = read_run(run_dir)
    some = read_run(run_dir, metrics=["update_ratio", "dead"])
    assert set(some.metrics) == {"update_ratio", "dead"}
    for name in some.metrics:
        np.testing.assert_array_equal(some.metrics[name], whole.metrics[name])
    np.testing.assert_array_equal(some.steps, whole.steps)
    np.testing.assert_array_equal(some.loss, whole.loss)
    assert some.layers == whole.layers
    calls = []  # the last rows with update_ratio are step 50's: the read still ends at 60 of 60
    read_run(run_dir, metrics=["update_ratio"], progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (60, 60) and max(done for done, _ in calls[:-1]) == 51
    with pytest.raises(ConfigError, match="unknown 'grad'; choose from grad_norm, "):
        read_run(run_dir, metrics=["grad"])


def test_the_report_of_a_run_with_its_findings_reads_what_it_draws_and_draws_the_same(run_dir, monkeypatch):
    import gradwatch.report as report

    whole = read_run(run_dir)
    write_findings(run_dir, diagnose(whole))
    findings = saved_findings(run_dir)
    expected = render_html(whole, findings=findings, title="r")
    read = []
    real = report.read_run
    monkeypatch.setattr(report, "read_run", lambda run, **kw: read.append(kw.get("metrics")) or real(run, **kw))
    assert render_html(run_dir, title="r") == expected
    assert read == [DRAWN_METRICS]
    assert set(read_series(run_dir, None).metrics) == set(LAYER_COLUMNS)  # no findings at hand: all, to diagnose


def _show(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["show", *map(str, args)]) == 0
    return out.getvalue()


def test_show_of_some_metrics_prints_what_a_whole_read_prints(run_dir, monkeypatch):
    shown = {m: _show(run_dir, "--metric", m) for m in ("grad_norm", "update_ratio,dead", "act_mean")}
    import gradwatch.cli.show_cmd as show_cmd

    real = show_cmd.summarise  # every metric read, the table still of the chosen ones
    monkeypatch.setattr(show_cmd, "summarise", lambda run, metrics, **kw: real(run, LAYER_COLUMNS, **kw))
    for metric, text in shown.items():
        assert _show(run_dir, "--metric", metric) == text
    assert "non-finite" in shown["grad_norm"]
