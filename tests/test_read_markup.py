"""Module names and paths are text in the terminal, never rich markup: a module named `[/]x` (any
string but a dot is a valid name for `add_module`) made `show` and `diagnose` end in a MarkupError
traceback, and `a[b]y` was shown as `ay`."""

from __future__ import annotations

import contextlib
import io
import time

from gradwatch.cli.main import main
from gradwatch.diagnose import Finding
from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter
from gradwatch.store.schema import LAYER_COLUMNS

NAMES = ["[/]x", "a[b]y", "[red]z[/red]"]


def store(directory):
    layers = [LayerInfo(name, "Linear", i, "param", 20) for i, name in enumerate(NAMES)]
    directory.mkdir()
    writer = RunStoreWriter(directory / "gradwatch.sqlite")
    rows = [(s, name, 1.0 + s, *[None] * (len(LAYER_COLUMNS) - 1)) for s in range(3) for name in NAMES]
    writer.write(FlushBatch(layers, steps=[(s, 1.0, 0.1, "", time.time()) for s in range(3)], layer_rows=rows))
    writer.close()
    return directory


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def test_show_prints_names_with_brackets_as_they_are(tmp_path):
    run = store(tmp_path / "[b]run")
    code, out, err = cli("show", run, "--metric", "grad_norm")
    assert code == 0 and err == ""
    for name in NAMES:
        assert f"│ {name} " in out
    assert f"{run}: 3 steps" in out


def test_diagnose_prints_names_with_brackets_as_they_are(tmp_path, monkeypatch):
    run = store(tmp_path / "[b]run")
    code, out, _ = cli("diagnose", run)
    assert code == 0 and out.strip() == f"{run}: no findings"
    finding = Finding("vanishing_gradient", "error", 0, tuple(NAMES), "The gradient vanishes.")
    monkeypatch.setattr("gradwatch.cli.diagnose_cmd.diagnose", lambda series: [finding])
    code, out, _ = cli("diagnose", run)
    assert code == 0 and out.splitlines()[0] == f"ERROR vanishing_gradient since step 0 in {', '.join(NAMES)}"
