"""Run experiments: seed, time, write the pages, and show progress (rich, on stderr)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gradwatch.errors import ConfigError
from gradwatch.lab import page
from gradwatch.lab.base import NULL_PROGRESS, Experiment, Result
from gradwatch.lab.base import Progress as ProgressLike
from gradwatch.runner import output_dir


class _RichProgress:
    """One bar per experiment; its description shows the current phase."""

    def __init__(self, bar: Progress, name: str):
        self.bar, self.name = bar, name
        self.task = bar.add_task(name, total=None)

    def phase(self, note: str, total: int) -> None:
        self.bar.update(self.task, description=f"{self.name}: {note}", total=total, completed=0)

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)

    def done(self, result: Result) -> None:
        self.bar.update(self.task, description=f"{self.name}: {page.verdict(result)} ({result.seconds:.1f} s)")


class _LineProgress:
    """Progress as plain lines, for a stderr that is not a terminal (a log file, a pipe, CI): rich's
    live bar draws nothing there until the end, so minutes of training would pass in silence. One
    line when a phase starts, one each time it crosses another tenth (at most one per `every`
    seconds: the demo's quick phases of a second each gave ten lines apiece), one when the
    experiment ends."""

    every = 5.0

    def __init__(self, console: Console, name: str):
        self.console, self.name = console, name
        self.note, self.total, self.completed, self.shown = "", 0, 0, 0
        self.start = self.last = time.perf_counter()

    def _line(self, text: str) -> None:
        self.last = time.perf_counter()
        self.console.print(f"{self.name}: {text} [{self.last - self.start:.0f} s]", markup=False,
                           highlight=False, soft_wrap=True)

    def phase(self, note: str, total: int) -> None:
        self.note, self.total, self.completed, self.shown = note, total, 0, 0
        self._line(f"{note} 0/{total}")

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self.total > 0:
            tenth = min(10, self.completed * 10 // self.total)
            if tenth > self.shown and time.perf_counter() - self.last >= self.every:
                self.shown = tenth
                self._line(f"{self.note} {min(self.completed, self.total)}/{self.total}")

    def done(self, result: Result) -> None:
        self._line(f"{page.verdict(result)} ({result.seconds:.1f} s)")


def run_one(exp: Experiment, quick: bool, out: Path, progress: ProgressLike = NULL_PROGRESS) -> Result:
    """Run one experiment with fixed seeds into out/<name>/ and write its page. The folder is
    proved writable first (ConfigError if not): minutes of training must not end in a traceback."""
    target = output_dir(Path(out) / exp.name)
    torch.manual_seed(0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # live findings of the watch: the page reports what matters
        result = exp.run(quick, target, progress)
    result.seconds = time.perf_counter() - start
    result.notes.insert(0, f"mode: {'quick' if quick else 'full'}")
    page.write(exp, result, target)
    return result


def unwritable(exc: ConfigError) -> Result:
    """The failed result of an experiment that was not run because its folder cannot be written."""
    result = Result([], [])
    result.check(f"not run: {exc}", False)
    return result


def run_many(exps: list[Experiment], quick: bool, out: Path, show: bool = True) -> list[tuple[Experiment, Result]]:
    """Run experiments in order with a progress bar each; write an index page when there are several.
    An experiment whose folder cannot be written fails with that reason and the rest still run."""
    console = Console(stderr=True)
    done: list[tuple[Experiment, Result]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    live = show and console.is_terminal
    with Progress(*columns, console=console, disable=not live) as bar:
        for exp in exps:
            tracker = _RichProgress(bar, exp.name) if live or not show else _LineProgress(console, exp.name)
            try:
                result = run_one(exp, quick, out, tracker)
            except ConfigError as exc:  # this experiment's folder cannot be written: the others still run
                result = unwritable(exc)
            tracker.done(result)
            done.append((exp, result))
    if len(done) > 1:
        page.write_index(done, Path(out))
    return done
