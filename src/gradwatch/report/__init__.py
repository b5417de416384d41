"""report: one self-contained HTML page per run (findings, gradient flow, heat maps, loss,
activations, metadata). Presentation only: numbers come from the store and from `diagnose`;
long runs are shrunk for display by step blocks, and the page says so."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gradwatch.diagnose import Finding, diagnose
from gradwatch.diagnose.finding import FINDINGS_FILE
from gradwatch.errors import ConfigError
from gradwatch.report.page import page
from gradwatch.store import RunSeries, read_run, store_files


def saved_findings(run: str | os.PathLike) -> list[Finding] | None:
    """RUN/findings.json when it is newer than the store (what `gradwatch run` found), else None."""
    path = Path(run)
    saved = path / FINDINGS_FILE if path.is_dir() else path.with_name(FINDINGS_FILE)
    try:
        if saved.stat().st_mtime < store_files(run)[0].stat().st_mtime:
            return None
        return [Finding.from_dict(d) for d in json.loads(saved.read_text())]
    except (OSError, ValueError, KeyError, TypeError):
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
        series, source = read_run(run), title or os.fspath(run)
        if findings is None:
            findings = saved_findings(run)
    if findings is None:
        findings = diagnose(series)
    if steps is not None and any(not isinstance(s, int) or isinstance(s, bool) for s in steps):
        raise ConfigError(f"steps={steps!r}: expected a list of step numbers")
    return page(series, list(findings), source, steps, __version__)


def write_report(run: RunSeries | str | os.PathLike, path: str | os.PathLike, **options) -> Path:
    """Write `render_html(run, **options)` to `path` (its folder is created); returns the path."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(run, **options), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {str(out)!r} ({exc.strerror}); choose another -o") from exc
    return out


__all__ = ["render_html", "saved_findings", "write_report"]
