"""The few lines `gradwatch run` prints on stderr when the watched command ends."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TextIO

import numpy as np

from gradwatch.diagnose.finding import write_findings
from gradwatch.errors import GradwatchError
from gradwatch.store import partial_note, read_run

def print_run_summary(run_dir: Path, out: TextIO, exit_code: int = 0) -> None:
    try:
        series = read_run(run_dir)
    except GradwatchError:
        if exit_code == 128 + signal.SIGKILL:  # it may have trained: killed before its first store write
            print(f"gradwatch: nothing was stored in {run_dir}", file=out)
        else:
            print(f"gradwatch: no training step was seen, nothing recorded in {run_dir}", file=out)
        return
    series.meta["live"] = False  # the lock read as live is this process's own: the command has ended
    from gradwatch.diagnose import diagnose

    findings = diagnose(series)
    try:
        write_findings(run_dir, findings)
    except OSError as exc:  # a full disk: the summary is still said
        print(f"gradwatch: cannot write {run_dir}/findings.json ({exc.strerror})", file=out)
    n_layers = len(series.weight_columns())
    loss = series.loss[~np.isnan(series.loss)]
    last = (f", last loss {loss[-1]:.4g}" if np.isfinite(loss[-1]) else ", last loss non-finite") if len(loss) else ""
    print(f"gradwatch: {len(series.steps)} steps, {n_layers} layers{last} -> {run_dir}", file=out)
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
    print(f"gradwatch: details: gradwatch diagnose {run_dir}", file=out)
