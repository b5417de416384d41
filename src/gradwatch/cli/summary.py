"""The few lines `gradwatch run` prints on stderr when the watched command ends."""

from __future__ import annotations

import contextlib
import shlex
import signal
import textwrap
from pathlib import Path
from typing import TextIO

import numpy as np

from gradwatch.diagnose.finding import write_findings
from gradwatch.diagnose.live import not_kept
from gradwatch.store.ending import signal_name
from gradwatch.errors import GradwatchError
from gradwatch.runner import FORKED_MARK, WATCHED_MARK
from gradwatch.store import RunSeries, partial_note, read_run, store_files
from gradwatch.store.reader import NOTHING_RECORDED

OTHERS_SHOWN = 5  # stores of further processes said one line each; past this, counted


def print_run_summary(run_dir: Path, out: TextIO, exit_code: int = 0) -> None:
    try:
        series = read_run(run_dir)
    except GradwatchError:
        said = _nothing_recorded(run_dir, exit_code)
        print(f"gradwatch: {said}", file=out)
        with contextlib.suppress(OSError):  # (a full disk: said above all the same)
            (run_dir / NOTHING_RECORDED).write_text(said + "\n")
        _say_forked_training(run_dir, out)
        return
    series.meta["live"] = False  # the lock read as live is this process's own: the command has ended
    from gradwatch.diagnose import diagnose

    findings = diagnose(series)
    try:
        write_findings(run_dir, findings)
    except OSError as exc:  # a full disk: the summary is still said
        print(f"gradwatch: cannot write {run_dir}/findings.json ({exc.strerror})", file=out)
    others = store_files(run_dir)[1:]
    who = f" ({_command(series)})" if others else ""
    print(f"gradwatch: {_headline(series)}{who} -> {run_dir}", file=out)
    if series.meta.get("resumed"):
        print(f"gradwatch: {_resumed(series.meta['resumed'])}", file=out)
    note = partial_note(series)
    if note and "SIGKILL" not in note:  # a SIGKILL is said by `gradwatch run` itself, with --flush-every
        print(f"gradwatch: partial run: {note}", file=out)
    for step, detail in series.meta.get("distributed_errors") or []:  # only an event row otherwise
        # rank 0's error is often only its peer closing the connection: the failing rank's own
        # traceback is in torchrun's output above
        print(f"gradwatch: the distributed run broke at step {step} ({detail}); the first rank to fail printed "
              "its own error above; the findings below are of the steps recorded before the break", file=out)
    if not findings:
        print("gradwatch: no findings", file=out)
    for f in findings:
        print(f.line(), file=out)
    for line in not_kept([tuple(x) for x in series.meta.get("live_findings") or []], findings):
        print(line, file=out)
    print(f"gradwatch: details: gradwatch diagnose {shlex.quote(str(run_dir))}", file=out)
    _print_other_stores(others, out, series.meta.get("pid"))
    _say_forked_training(run_dir, out)


def _say_forked_training(run_dir: Path, out: TextIO) -> None:
    if (run_dir / FORKED_MARK).exists():
        # (Hogwild's torch.multiprocessing.Process workers too, not only a Pool's)
        print("gradwatch: a process forked from a watched one trained, unrecorded (a multiprocessing Process or Pool "
              "worker, started by fork); to record each, start them with multiprocessing.get_context('spawn')", file=out)


def _nothing_recorded(run_dir: Path, exit_code: int) -> str:
    """Why a run directory holds no store, from how the command ended and whether any of its
    processes was watched (the start-up hook marks the directory)."""
    where = f"nothing recorded in {run_dir}"
    if exit_code == 128 + signal.SIGKILL:  # it may have trained: killed before its first store write
        return f"nothing was stored in {run_dir}"
    watched = (run_dir / WATCHED_MARK).exists()
    if exit_code:
        before = "any training step was seen" if watched else "importing torch"
        how = (f"was stopped by {name}" if (name := signal_name(exit_code)) else f"ended with exit code {exit_code}")
        return f"the command {how} before {before}; {where}"
    if not watched:
        return (f"no process of the command imported torch with gradwatch's start-up hook loaded (`python -I`, "
                f"`-E` or `-S`, or a reset PYTHONPATH, skips the hook); {where}")
    return f"no training step was seen, {where}"


def _headline(series: RunSeries) -> str:
    n_layers = len(series.weight_columns())
    loss = series.loss[~np.isnan(series.loss)]
    last = (f", last loss {loss[-1]:.4g}" if np.isfinite(loss[-1]) else ", last loss non-finite") if len(loss) else ""
    # (a sweep's worker, a script training model after model: each model's layers are its own)
    trainings = len(series.meta.get("phase_starts") or []) + 1
    of = f" of {trainings} models trained one after another" if trainings > 1 else ""
    return f"{_count(len(series.steps), 'step')}, {_count(n_layers, 'layer')}{of}{last}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _resumed(resumed: dict) -> str:
    """How a training resumed from a checkpoint is numbered (meta `resumed`: collect.auto)."""
    optimizer, at = resumed.get("optimizer", "the optimizer"), resumed.get("at_step")
    if at is None:
        return (f"the training resumed from a checkpoint, but {optimizer}'s loaded state keeps no step count: its "
                "steps are numbered from 0 here, not from the checkpoint's step")
    return f"the training resumed from a checkpoint: its steps are numbered from {at}, the steps {optimizer}'s loaded state had taken"


def _command(series: RunSeries) -> str:
    """The process's command line as it saw it (sys.argv), to tell one store from another."""
    argv = series.meta.get("command") or []
    return textwrap.shorten(" ".join(map(str, argv)), 60, placeholder=" ...") or "?"


def _print_other_stores(paths: list[Path], out: TextIO, main_pid: int | None = None) -> None:
    """Further processes that trained (a shell script's second python, a spawn Pool's workers,
    torchrun's other ranks with all_ranks) each wrote a store of their own: `gradwatch diagnose RUN`
    reads only the first, so each other one is named here with what it holds. One of the main
    store's pid is the same process after an os.execv (a script restarting itself), not another."""
    from gradwatch.diagnose import diagnose

    for path in paths[:OTHERS_SHOWN]:
        try:
            series = read_run(path)
        except GradwatchError as exc:
            print(f"gradwatch: another process's store: {exc}", file=out)
            continue
        series.meta["live"] = False
        kinds = sorted({f.kind for f in diagnose(series)})
        found = f"findings: {', '.join(kinds)}" if kinds else "no findings"
        who = "the same process after os.execv" if main_pid is not None and series.meta.get("pid") == main_pid \
            else "another process"
        print(f"gradwatch: {who} ({_command(series)}): {_headline(series)}, {found}; "
              f"gradwatch diagnose {shlex.quote(str(path))}", file=out)
    if len(paths) > OTHERS_SHOWN:
        print(f"gradwatch: and {len(paths) - OTHERS_SHOWN} more stores of other processes in {paths[0].parent}",
              file=out)
