"""Where the report goes: refused before any work when it cannot be written, and never left cut short."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwatch.errors import ConfigError
from test_store_partial import cli, written


def test_an_unwritable_report_path_is_refused_before_reading_and_diagnosing(tmp_path, monkeypatch):
    """On a read-only run directory `gradwatch report` read, diagnosed and drew the run (half a
    minute for a long one) before it found it could not write the page."""
    from gradwatch.cli import report_cmd

    written(tmp_path / "gradwatch.sqlite", 5).close()
    (tmp_path / "afile").write_text("in the way")

    def never(*args, **kwargs):
        raise AssertionError("read before the output was checked")

    monkeypatch.setattr(report_cmd, "read_series", never)
    code, _, err = cli("report", tmp_path, "-o", tmp_path / "afile" / "r.html")
    assert code == 2 and f"cannot write the report to {str(tmp_path / 'afile' / 'r.html')!r}" in err
    assert "reading" not in err  # refused before the first stage
    code, _, err = cli("report", tmp_path / "missing", "-o", tmp_path / "new" / "r.html")
    assert code == 2 and "no run at" in err and not (tmp_path / "new").exists()  # the run is checked first


def test_a_report_that_fails_midway_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """A disk filling up while the page is written left report.html cut short, the earlier report
    lost with it: the page now goes to a file beside it, renamed over it when whole."""
    import gradwatch.report as report

    written(tmp_path / "gradwatch.sqlite", 5).close()
    out = tmp_path / "report.html"
    before = "<!DOCTYPE html><html><body>the earlier report</body></html>\n"
    out.write_text(before)

    class FullDisk:  # takes the first 100 characters, then the disk is full
        def __init__(self, path, mode, encoding):
            self._f = open(path, mode, encoding=encoding)

        def write(self, text):
            self._f.write(text[:100])
            self._f.flush()
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(report, "open", FullDisk, raising=False)
    with pytest.raises(ConfigError, match="cannot write the report to .* \\(No space left on device\\)"):
        report.write_report(tmp_path, out, findings=[])
    assert out.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no part file left


def test_saved_findings_are_used_when_written_after_the_last_step_whatever_the_files_time(tmp_path):
    """A `gw.watch` store's file is rewritten when its last connection closes (SQLite folds its log
    in), after the findings were written: export and report took them for stale and diagnosed the
    run again (31 s on a 20,000-step, 300-layer run). Freshness is now the last step's record time."""
    import json
    import os
    import time

    from gradwatch.diagnose.finding import Finding
    from gradwatch.report import saved_findings

    written(tmp_path / "gradwatch.sqlite", 5).close()
    saved = tmp_path / "findings.json"
    saved.write_text(json.dumps([Finding("loss_plateau", "info", 3, (), "saved").to_dict()]))
    later = time.time() + 5
    os.utime(tmp_path / "gradwatch.sqlite", (later, later))  # the file rewritten, no step added
    assert [f.message for f in saved_findings(tmp_path)] == ["saved"]
    earlier = time.time() - 60  # written before the store's steps (an earlier run's): stale
    os.utime(saved, (earlier, earlier))
    assert saved_findings(tmp_path) is None
    saved.write_text("{not json")
    assert saved_findings(tmp_path) is None
    # another process's store beside the main one: RUN/findings.json is not its findings
    saved.write_text(json.dumps([Finding("loss_plateau", "info", 3, (), "saved").to_dict()]))
    written(tmp_path / "gradwatch-pid42.sqlite", 5).close()
    assert saved_findings(tmp_path / "gradwatch.sqlite") is not None
    assert saved_findings(tmp_path / "gradwatch-pid42.sqlite") is None


def test_a_directory_given_as_output_gets_the_report_inside_and_the_api_refuses_it_at_once(tmp_path, monkeypatch):
    """`gradwatch report RUN -o reports/` read, diagnosed and drew the run, then failed with "Is a
    directory": the check before the work wrote its test file beside the directory, which worked."""
    from gradwatch.report import write_report

    (tmp_path / "run").mkdir()
    written(tmp_path / "run" / "gradwatch.sqlite", 5).close()
    (tmp_path / "reports").mkdir()
    code, out, _ = cli("report", tmp_path / "run", "-o", tmp_path / "reports")
    assert code == 0 and (tmp_path / "reports" / "report.html").stat().st_size > 1000
    assert str(tmp_path / "reports" / "report.html") in out
    with pytest.raises(ConfigError, match="a directory; give a file"):
        write_report(tmp_path / "run", tmp_path / "reports", findings=[])


def test_an_empty_tensorboard_directory_is_refused(tmp_path, monkeypatch):
    """`gradwatch export RUN --tensorboard ""` wrote into runs/<date>_<host> of the current
    directory (TensorBoard's own default) and said "Wrote 5 steps to TensorBoard logs in  ()"."""
    pytest.importorskip("tensorboard")
    (tmp_path / "run").mkdir()
    written(tmp_path / "run" / "gradwatch.sqlite", 5).close()
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("export", tmp_path / "run", "--tensorboard", "")
    assert code == 2 and "give a directory, e.g. --tensorboard runs/tb" in err
    assert not (tmp_path / "runs").exists()


def test_a_run_directory_that_cannot_be_written_is_answered_with_where_to_write_instead(tmp_path, monkeypatch):
    """A run the user may read, not write (a shared or archived run; not testable by permissions as
    root): "choose another -o" alone left the user to make one up."""
    from gradwatch.cli import report_cmd
    from gradwatch.report import _unwritable

    run = tmp_path / "20260101-120000"
    run.mkdir()
    written(run / "gradwatch.sqlite", 5).close()

    def read_only(path):
        if Path(path).parent == run:
            raise _unwritable(Path(path), PermissionError(13, "Permission denied"))

    monkeypatch.setattr(report_cmd, "check_writable", read_only)
    code, _, err = cli("report", run)
    assert code == 2 and err.strip() == (f"gradwatch: error: cannot write the report to {str(run / 'report.html')!r} "
                                         "(Permission denied); choose another -o, e.g. -o 20260101-120000-report.html "
                                         "(into the current directory)")
    code, _, err = cli("report", run, "-o", run / "mine.html")  # a path given: refused as it was
    assert code == 2 and err.strip().endswith("(Permission denied); choose another -o")
