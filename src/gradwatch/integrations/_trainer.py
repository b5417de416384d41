"""What the Lightning and Hugging Face callbacks share: a `Watch` on the trainer's model and
optimizer writing the usual store, the steps each flush wrote (for the framework's logger), and
findings reported once each, live and at the end (also written to OUT/findings.json, as
`gradwatch run` does, so `gradwatch report OUT` shows them)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from gradwatch.collect.watch import Watch, positive_int
from gradwatch.diagnose.live import check_stop_on
from gradwatch.diagnose.finding import write_findings
from gradwatch.errors import ConfigError, first_line
from gradwatch.integrations._rows import StepRows, WatchStore, rows_since
from gradwatch.runner import output_dir, prepare_run_dir
from gradwatch.store.writer import finish_store


def base_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer), whose step hooks run on every real step."""
    seen = 0
    while not type(optimizer).__module__.startswith("torch.") and seen < 5:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"cannot watch the optimizer {type(optimizer).__name__}: not a torch.optim.Optimizer")
    return optimizer


def ending(n_steps: int, findings: list, out: Path) -> str:
    """The line said when a training ends: the callbacks were silent, and where the store went
    (`<default_root_dir>/gradwatch`, `<output_dir>/gradwatch`) was for the user to know."""
    worst = next((s for s in ("error", "warning", "info") if any(f.severity == s for f in findings)), None)
    found = f"{len(findings)} finding{'s' * (len(findings) != 1)} (worst: {worst})" if findings else "no findings"
    where = shlex.quote(os.fspath(out))
    return (f"gradwatch: {n_steps} step{'s' * (n_steps != 1)} recorded in {out}, {found}; "
            f"the HTML report: gradwatch report {where}")


class Recorder:
    """One training's watch. `report(finding)` is called once per new finding."""

    def __init__(self, out, report: Callable, *, every: int, sample_every: int, flush_every: int, stop_on=(),
                 say: Callable[[str], None] | None = None):
        # bad arguments are said when the callback is made, not when training starts
        if out is not None and not isinstance(out, (str, os.PathLike)):
            raise ConfigError(f"out={out!r}: expected a directory path (str or Path), or None for the default")
        for name, value in (("every", every), ("sample_every", sample_every), ("flush_every", flush_every)):
            positive_int(name, value)
        check_stop_on(stop_on)
        self.out = out
        self.report = report
        self.say = say  # the run's last line: where it is stored and how to see it
        self._writer = True  # False on the ranks of a distributed watch that only take part
        self.options = dict(every=every, sample_every=sample_every, flush_every=flush_every, stop_on=stop_on)
        self.watch: Watch | None = None
        self.out_dir: Path | None = None
        self._store = WatchStore()
        self._logged = -1
        self._seen: set[tuple[str, str]] = set()
        self.findings: list | None = None  # set by finish()

    def start(self, model: torch.nn.Module, optimizer: object, default_out: str | os.PathLike, framework: str,
              rank_dir: str | None = None, writer: bool = True, first_step: int = 0,
              grad_clip: str | None = None) -> Watch:
        """Watch one training (a reused callback starts afresh); `rank_dir`: this process's
        subdirectory when the training spans several (one store per process); `writer`: False on
        the ranks that only take part in a distributed watch, which must not touch rank 0's store;
        `first_step`: the trainer's global step, N > 0 when it continues a training (a second fit,
        a resume from a checkpoint), whose steps before N stay in the store; `grad_clip`: how the
        trainer clips the gradients (`the total norm to 1 (max_grad_norm)`), kept in the run's metadata: the
        norms recorded are taken before it, and the report says both."""
        if self.watch is not None:  # the last training ended on an exception (HF's Trainer says nothing)
            self.watch.detach()  # its hooks would stay on the model, recording beside the new watch
            self._store.close()
        self.out_dir = Path(self.out if self.out is not None else default_out)
        if rank_dir is not None:
            self.out_dir = self.out_dir / rank_dir
        self._logged, self._seen, self.findings = first_step - 1, set(), None
        self._writer = writer
        if writer and first_step:
            output_dir(self.out_dir, what="the run directory")  # writable, the run kept
        elif writer:
            prepare_run_dir(self.out_dir)  # writable, and a new training replaces the run, as `gradwatch run` does
        meta = {"command": list(sys.argv), "framework": framework, "pid": os.getpid()}
        if grad_clip:
            meta["grad_clip"] = grad_clip
        # status=False: the framework's progress bar owns the terminal
        self.watch = Watch(model, base_optimizer(optimizer), out=self.out_dir, meta=meta, on_finding=self._found,
                           warn=False, status=False, first_step=first_step, **self.options)
        return self.watch

    def _found(self, finding) -> None:
        key = (finding.kind, finding.layers[0] if finding.layers else "")
        if key not in self._seen:
            self._seen.add(key)
            self.report(finding)

    def new_steps(self) -> Iterator[StepRows]:
        """The steps flushed since the last call."""
        db = self._store.connection(self.watch) if self.watch is not None else None
        if db is None:
            return
        for row in rows_since(db, self._logged):
            self._logged = row.step
            yield row

    def finish(self, error: BaseException | None = None) -> list:
        """Detach (flushing the last steps), diagnose the whole run, report what is new, and write
        OUT/findings.json. Returns all findings. `error`: the training stopped on it, as the store
        then says (a partial run, in diagnose, show and report)."""
        if self.watch is None or self.findings is not None:
            return self.findings or []
        from gradwatch.diagnose import diagnose

        self.watch.detach()
        if error is not None and self.watch.store_path is not None and self.watch.store_path.is_file():
            finish_store(self.watch.store_path, 1, first_line(error, 200))
        series = self.watch.stored_series()
        findings = diagnose(series) if len(series.steps) else []
        for f in findings:
            self._found(f)
        if self.out_dir is not None and len(series.steps):
            write_findings(self.out_dir, findings)
            if self.say is not None and self._writer:
                self.say(ending(len(series.steps), findings, self.out_dir))
        self.findings = findings
        return findings

    def close(self) -> None:
        self._store.close()
