"""gradwatch report: one self-contained HTML file with the findings and the pictures of a run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gradwatch.cli import Reading, say, say_which_store
from gradwatch.diagnose import diagnose
from gradwatch.errors import ConfigError
from gradwatch.report import check_writable, read_series, saved_findings, write_report
from gradwatch.report.page import count
from gradwatch.store import store_files


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        description="Write one HTML file that works offline (no network, no script): the findings with their "
                    "evidence and remedy code, the gradient flow input -> output at chosen steps, heat maps of "
                    "log10 gradient norm and update ratio (layers x steps), the loss with the findings marked, "
                    "dead/saturated fractions per activation layer, and the run's metadata. Long runs are "
                    "downsampled for display by step blocks, and the page says so.")
    p.add_argument("run", help="run directory or .sqlite store")
    p.add_argument("-o", "--output", help="HTML file to write, or a directory to write it into (default: RUN/report.html)")
    p.add_argument("--steps", help="steps of the gradient-flow picture, comma-separated (default: five spread over the run)")
    p.set_defaults(func=main)


def _steps(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--steps={text!r}: expected step numbers separated by commas, e.g. --steps 0,100,1000") from None


def main(args: argparse.Namespace) -> int:
    run = Path(args.run)
    default = run / "report.html" if run.is_dir() else run.with_suffix(".html")
    output = args.output
    if output and Path(output).is_dir():  # `-o reports/`: into it, as cp does (it was refused after the work)
        output = os.path.join(output, default.name)
    steps = _steps(args.steps)
    store_files(run)  # a run to read,
    try:  # and a file to write, before the work (a long run's takes a minute)
        check_writable(output or default)
    except ConfigError as exc:
        if output:
            raise
        # a run directory the user may read, not write (a shared or archived run): where to, instead
        elsewhere = f"{run.resolve().name}-report.html"
        raise ConfigError(f"{exc}, e.g. -o {elsewhere} (into the current directory)") from None
    # Each stage says what it does: a deep run's report took 10-35 s in silence (drawing alone
    # about 1 s per picture, diagnosing without an up-to-date findings.json most of the rest).
    findings = saved_findings(run)
    say(f"reading {run}")
    say_which_store(run)
    series = read_series(run, findings, progress=Reading(run))
    if steps and len(series.steps):  # drawn at the nearest recorded step: said, not silently
        recorded = set(series.steps.tolist())
        missing = [s for s in dict.fromkeys(steps) if s not in recorded]
        if missing:
            every = series.meta.get("every", 1)
            which = f"steps {series.steps[0]}-{series.steps[-1]}" + (f", one in {every} recorded" if every > 1 else "")
            say(f"--steps: {', '.join(map(str, missing))} not recorded (this run has {which}): "
                "the nearest recorded step is drawn instead")
    if findings is None:
        say(f"diagnosing {count(len(series.steps), 'step')} x {count(len(series.layers), 'layer')} "
            "(no up-to-date findings.json)")
        findings = diagnose(series)
    say("drawing the pictures")
    out = write_report(series, output or default, findings=findings, steps=steps, title=os.fspath(run))
    print(f"Wrote HTML report to {out}")
    return 0
