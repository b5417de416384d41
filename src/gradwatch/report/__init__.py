"""report: one self-contained HTML page per run (findings, gradient flow, heat maps, loss,
activations, metadata). Presentation only: numbers come from the store and from `diagnose`;
long runs are shrunk for display by step blocks, and the page says so."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from gradwatch.diagnose import Finding, diagnose
from gradwatch.diagnose.finding import FINDINGS_FILE
from gradwatch.errors import ConfigError, GradwatchError
from gradwatch.report.page import DRAWN_METRICS, page
from gradwatch.store import RunSeries, read_run, store_files
from gradwatch.store.reader import Progress, connect


def saved_findings(run: str | os.PathLike) -> list[Finding] | None:
    """RUN/findings.json when it was written after the store's last step was recorded (what
    `gradwatch run` or a callback found at the end of the run), else None.

    Not the store file's own time: SQLite folds its log into the file when its last connection
    closes, which for a `gw.watch` store is when the watch is collected, after the findings were
    written; up-to-date findings were taken for stale, and the run diagnosed again."""
    path = Path(run)
    saved = path / FINDINGS_FILE if path.is_dir() else path.with_name(FINDINGS_FILE)
    try:
        if not path.is_dir() and store_files(path.parent)[0].resolve() != path.resolve():
            return None  # RUN/findings.json is the main store's: another process's store is diagnosed
        written = saved.stat().st_mtime
        db = connect(store_files(run)[0])
        try:
            last = db.execute("SELECT max(wall_time) FROM steps").fetchone()[0]
        finally:
            db.close()
        if last is None or written < last:
            return None
        return [Finding.from_dict(d) for d in json.loads(saved.read_text())]
    except (OSError, ValueError, KeyError, TypeError, GradwatchError, sqlite3.Error):
        return None


def render_html(run: RunSeries | str | os.PathLike, *, findings: list[Finding] | None = None,
                steps: list[int] | None = None, title: str | None = None) -> str:
    """The report of a run (a `RunSeries`, a run directory or a store file) as one HTML string.

    `findings`: shown instead of running `diagnose` (a run directory's findings.json is used when
    it is up to date); `steps`: the steps of the gradient-flow picture (default: five spread over
    the run); `title`: how the page names the run.
    """
    from gradwatch import __version__

    if isinstance(run, RunSeries):
        series, source = run, title or "run"
    else:
        if findings is None:
            findings = saved_findings(run)
        series, source = read_series(run, findings), title or os.fspath(run)
    if findings is None:
        findings = diagnose(series)
    if steps is not None and any(not isinstance(s, int) or isinstance(s, bool) for s in steps):
        raise ConfigError(f"steps={steps!r}: expected a list of step numbers")
    return page(series, list(findings), source, steps, __version__)


def read_series(run: str | os.PathLike, findings: list[Finding] | None,
                progress: Progress | None = None) -> RunSeries:
    """The run as the report needs it: with its findings at hand, only the metrics it draws (a
    50k-step x 480-layer run: 1.1 of 1.8 GB, read in less time); else all, to diagnose it."""
    return read_run(run, progress=progress, metrics=DRAWN_METRICS if findings is not None else None, compact=True)


def write_report(run: RunSeries | str | os.PathLike, path: str | os.PathLike, **options) -> Path:
    """Write `render_html(run, **options)` to `path` (its folder is created); returns the path.

    The file is opened before the page is made: a folder that cannot be written (read-only, full)
    was found only after the diagnosis and the drawing (half a minute on a long run). The page goes
    to a file beside `path`, renamed over it when whole: an earlier report is never left cut short."""
    out = Path(path)
    part = _part(out)
    _not_a_directory(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = open(part, "w", encoding="utf-8")
    except OSError as exc:
        raise _unwritable(out, exc) from exc
    try:
        with f:
            text = render_html(run, **options)
            f.write(text)
        os.replace(part, out)
    except OSError as exc:
        raise _unwritable(out, exc) from exc
    finally:
        part.unlink(missing_ok=True)
    return out


def check_writable(path: str | os.PathLike) -> None:
    """Refuse a report path that cannot be written, before any work (see `write_report`)."""
    out = Path(path)
    part = _part(out)
    _not_a_directory(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        part.touch()
        part.unlink()
    except OSError as exc:
        raise _unwritable(out, exc) from exc


def _not_a_directory(out: Path) -> None:
    """A directory as the report's path: the part file beside it can be written, so it was refused
    only after the diagnosis and the drawing, when the page was renamed over it."""
    if out.is_dir():
        raise ConfigError(f"cannot write the report to {str(out)!r}: a directory; give a file, "
                          f"e.g. {str(out / 'report.html')!r}")


def _part(out: Path) -> Path:
    """The file beside `out` a report is written to before it is renamed over `out`."""
    return out.with_name(f".{out.name}.{os.getpid()}.part")


def _unwritable(out: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write the report to {str(out)!r} ({exc.strerror}); choose another -o")


__all__ = ["check_writable", "read_series", "render_html", "saved_findings", "write_report"]
