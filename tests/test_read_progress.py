"""A long read says how far it is: `show`, `diagnose` and `report` of a 50k-step x 480-layer store
read for two minutes before they said anything more than 'reading'."""

from __future__ import annotations

import contextlib
import io
import re
import time

import numpy as np
import pytest

import gradwatch.store.reader as reader
from gradwatch.cli.main import main
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter, read_run
from gradwatch.store.schema import LAYER_COLUMNS

LAYERS = [LayerInfo(f"fc{i}", "Linear", i, "param", 20) for i in range(3)]


def store(path, n_steps):
    writer = RunStoreWriter(path / "gradwatch.sqlite")
    for first in range(0, n_steps, 25):
        steps = range(first, min(first + 25, n_steps))
        rows = [(s, l.name, (s + 1.0) * (i + 1), *[float(s % 7)] * (len(LAYER_COLUMNS) - 1))
                for s in steps for i, l in enumerate(LAYERS)]
        writer.write(FlushBatch(LAYERS, steps=[(s, 1.0 / (s + 1), 0.1, "", time.time()) for s in steps],
                                layer_rows=rows))
    writer.close()


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", [["show"], ["diagnose"], ["report", "-o", "page.html"]])
def test_a_long_read_says_each_tenth_on_stderr(tmp_path, monkeypatch, command):
    store(tmp_path, 200)
    monkeypatch.setattr(reader, "READ_CHUNK_ROWS", 30)  # 10 steps x 3 layers a chunk: 20 chunks
    monkeypatch.setattr("gradwatch.cli.PATIENCE", 0.0)  # as if each chunk took seconds
    if command[0] == "report":  # the reading is the point here, not the drawing (seconds of matplotlib)
        command = ["report", "-o", tmp_path / "page.html"]
        monkeypatch.setattr("gradwatch.cli.report_cmd.write_report", lambda series, path, **_: path)
    code, _, err = cli(command[0], tmp_path, *command[1:])
    said = [tuple(map(int, m)) for m in re.findall(r"reading .*: (\d+) of (\d+) steps", err)]
    assert code == 0 and len(said) == 10  # a line per tenth, not per chunk
    assert [d for d, _ in said] == sorted({d for d, _ in said}) and said[-1] == (200, 200)
    assert {t for _, t in said} == {200}
    if command[0] == "diagnose":  # after a long read, the rules' turn is said too
        assert err.splitlines()[-1] == "gradwatch: diagnosing 200 steps x 3 layers"


def test_a_short_read_says_nothing_and_progress_changes_no_value(tmp_path, monkeypatch):
    store(tmp_path, 40)
    monkeypatch.setattr(reader, "READ_CHUNK_ROWS", 30)
    for command in ("show", "diagnose"):
        code, _, err = cli(command, tmp_path)
        assert code == 0 and err == ""  # read in well under PATIENCE: no progress line
    whole = read_run(tmp_path)
    monkeypatch.setattr(reader, "READ_CHUNK_ROWS", 7)  # chunks that end inside a step
    calls = []
    chunked = read_run(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (40, 40) and all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    for name in LAYER_COLUMNS:
        np.testing.assert_array_equal(whole.metrics[name], chunked.metrics[name])
