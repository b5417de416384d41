"""TensorBoard: a run's scalars per layer and metric (`grad_norm/<layer>`, ...), loss, lr, and the
findings as text; after the run (`export`, `gradwatch export RUN --tensorboard DIR`) or live as a
`Watch` flush callback (`TensorBoardSink`). Needs the `tensorboard` package.

Gradient norms are those gradwatch records: taken before any clipping (see docs/report.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from gradwatch.errors import ConfigError
from gradwatch.integrations._rows import StepRows, WatchStore, rows_since

ABOUT = ("gradwatch: per-layer statistics (docs/statistics.md). `grad_norm/<layer>` is the L2 norm of the "
         "layer's gradients taken **before** any gradient clipping (and unscaled under GradScaler).")


EXPORT_SUFFIX = ".gradwatch-export"  # an export's event files: the next export of a run replaces them


def checked_logdir(logdir: str | os.PathLike) -> str:
    """The log directory, refused when empty: TensorBoard's writer then picks `runs/<date>_<host>`
    itself, and `gradwatch export RUN --tensorboard ""` wrote there while saying "in  ()"."""
    path = os.fspath(logdir)
    if not path.strip():
        raise ConfigError(f"TensorBoard log directory {path!r}: give a directory, e.g. --tensorboard runs/tb")
    return path


def summary_writer(logdir: str | os.PathLike, suffix: str = ""):
    logdir = checked_logdir(logdir)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("TensorBoard export needs the tensorboard package: "
                          "pip install tensorboard (or gradwatch[integrations])") from exc
    try:
        return SummaryWriter(log_dir=os.fspath(logdir), filename_suffix=suffix)
    except OSError as exc:
        raise ConfigError(f"cannot write TensorBoard logs to {os.fspath(logdir)!r} ({exc.strerror}); "
                          "choose another --tensorboard directory") from exc


def write_step(writer, row: StepRows) -> None:
    """All of a step's scalars as one event: an event per value (`add_scalar`) took 5x the time
    and 2.4x the bytes (a 20,000-step, 300-layer run: over 16 minutes and 300 MB, unfinished)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=tag, simple_value=v) for tag, v in (("loss", row.loss), ("lr", row.lr)) if v is not None]
    if len(set(row.lrs)) > 1:  # groups at different rates (a backbone at lr/100): each, not the first only
        values += [Summary.Value(tag=f"lr/group{i}", simple_value=v) for i, v in enumerate(row.lrs)]
    values += [Summary.Value(tag=f"{metric}/{layer}", simple_value=v) for layer, metric, v in row.values]
    writer.file_writer.add_summary(Summary(value=values), row.step)


def finding_text(f) -> str:
    """A finding as TensorBoard's Markdown text."""
    lines = [f"**{f.severity.upper()}** `{f.kind}` since step {f.first_step}", "", f.message]
    if f.layers:
        lines += ["", "layers: " + ", ".join(f"`{l}`" for l in f.layers[:20]) + (" ..." if len(f.layers) > 20 else "")]
    for r in f.remedies:
        lines += ["", f"- {r.action}: `{r.code}`"]
    return "\n".join(lines)


def write_findings(writer, findings: list, start: int = 0) -> None:
    """Each finding as text, numbered from `start` (a live sink writes the new ones per flush)."""
    for n, f in enumerate(findings, start):
        writer.add_text(f"findings/{n}_{f.kind}", finding_text(f), f.first_step)


def export(run: str | os.PathLike, logdir: str | os.PathLike, findings: list | None = None,
           progress: Callable[[str], None] | None = None) -> int:
    """Write a recorded run (a run directory or store file) as TensorBoard event files under
    `logdir`; returns the number of steps written. The findings are `findings`, else the run's
    findings.json when it is up to date (as for the report), else `gw.diagnose(run)`.
    `progress(text)` is told each stage (a 20,000-step run takes minutes)."""
    say = progress or (lambda text: None)
    from gradwatch.diagnose import diagnose
    from gradwatch.report import saved_findings
    from gradwatch.store.reader import connect, read_meta, store_files

    checked_logdir(logdir)  # (before the clean-up below: "" is the current directory)
    db = connect(store_files(run)[0])
    # exported again into the same folder, every point was there twice
    for old in Path(logdir).glob(f"events.out.tfevents.*{EXPORT_SUFFIX}"):
        old.unlink()
    writer = summary_writer(logdir, EXPORT_SUFFIX)
    n = 0
    try:
        clip = read_meta(db).get("grad_clip")  # a trainer's clipping, kept by the callbacks
        writer.add_text("gradwatch", ABOUT + (f" The trainer then clipped {clip}." if clip else ""), 0)
        say("writing the steps")
        for row in rows_since(db):
            write_step(writer, row)
            n += 1
            if n % 5000 == 0:
                say(f"{n:,} steps written")
        if findings is None:  # diagnosing reads the whole run: 31 s and 0.86 GB for 20,000 steps x 300 layers
            findings = saved_findings(run)
        if findings is None:
            say(f"diagnosing {n:,} step{'s' * (n != 1)} (no up-to-date findings.json)")
        write_findings(writer, diagnose(run) if findings is None else findings)
    finally:
        writer.close()
        db.close()
    return n


class TensorBoardSink:
    """Live export: `watch.on_flush.append(TensorBoardSink("tb"))` writes each flushed step's
    scalars; findings that `live` (the watch's LiveDiagnosis) has found are written as text, and
    without one (live=None; a watch with warn=False and no on_finding has none) the sink
    diagnoses on the same schedule itself, silently. `watch.detach()` closes it."""

    def __init__(self, logdir: str | os.PathLike, live=None):
        self.logdir = Path(logdir)
        self._own_live = live is None
        if live is None:  # before, a sink without one wrote no finding at all
            from gradwatch.diagnose.live import LiveDiagnosis

            live = LiveDiagnosis(warn=False)
        self.live = live
        self._writer = summary_writer(self.logdir)
        self._writer.add_text("gradwatch", ABOUT, 0)
        self._store = WatchStore()
        self._last = -1
        self._findings = 0
        self._closed = False

    def __call__(self, watch) -> None:
        if self._closed:  # closed by hand before the watch's last flush: that flush wrote to a closed writer
            return
        db = self._store.connection(watch)
        if db is None:
            return
        for row in rows_since(db, self._last):
            write_step(self._writer, row)
            self._last = row.step
        if self._own_live:
            self.live(watch)
        self._write_new_findings()
        self._writer.flush()

    def _write_new_findings(self) -> None:
        """The live diagnosis's findings not written yet, numbered on from those that were."""
        found = list(getattr(self.live, "findings", []))
        write_findings(self._writer, found[self._findings:], self._findings)
        self._findings = len(found)

    def close(self) -> None:
        """End the event file (`watch.detach()` calls this after its last flush). The live
        diagnosis is closed first (`LiveDiagnosis.close`, once per stored step whoever calls it):
        it runs at every tenth of the run's growth, so what the last steps showed (a NaN at step
        205 of 210) was never written."""
        if self._closed:
            return
        self._closed = True
        try:
            getattr(self.live, "close", lambda: None)()
            self._write_new_findings()
        finally:
            self._writer.close()
            self._store.close()
