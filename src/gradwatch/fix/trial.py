"""One trial: the user's command, unmodified, run for a budget of steps with one remedy applied
through the zero-code hooks, then measured (findings left, loss reached)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gradwatch import runner
from gradwatch.diagnose import diagnose
from gradwatch.diagnose.finding import Finding, write_findings
from gradwatch.diagnose.signals import skipped_after_last
from gradwatch.errors import ConfigError, GradwatchError
from gradwatch.fix.candidates import HARMFUL, Candidate, phase_changes
from gradwatch.fix.inject import (BUDGET_REACHED, ENV_MAX_STEPS, ENV_REMEDY, NOT_APPLIED, PROGRESS, STOP_AFTER_NON_FINITE,
                                  STOPPED_NON_FINITE, Injector)
from gradwatch.fix.locate import ENV_LOCATE_AT, ORIGIN
from gradwatch.fix.pause import Channel
from gradwatch.fix.touched import ENV_WRITES, WRITTEN, WROTE
from gradwatch.store import read_run
from gradwatch.store.series import WEIGHT_ROLES, RunSeries

# Not a finding of the diagnosis but a trial's: its loss ended no lower than it began.
NO_PROGRESS = "loss_did_not_fall"


@dataclass
class Trial:
    candidate: Candidate
    run_dir: Path
    exit_code: int
    seconds: float
    steps: int = 0
    final_loss: float = float("inf")
    findings: list[Finding] = field(default_factory=list)
    first_loss: float = float("nan")  # the median of the first tenth of the losses (nan: not measured)
    start_loss: float = float("nan")  # the first loss, before any update
    not_applied: str = ""  # why the remedy changed nothing (the trial ended before its first step)
    final_error: float = float("nan")  # the standard error of final_loss (nan: not measured)
    # ... by the standard deviation, wider where the window holds bursts or a trend: the decisions to
    # stop or skip a remedy take it (by the MAD, a sigmoid CIFAR net's Leaky ReLU final was stopped
    # at half, behind, and would have ended the repair: 7.46e-5 against SELU's 3.2e-4)
    spread_error: float = float("nan")
    untrained: frozenset[str] = frozenset()  # the layers no optimizer trains (see `untrained_layers`)
    trained: frozenset[str] = frozenset()  # the weight layers an optimizer trains
    cut: bool = False  # the budget ended it, not the script: it had more to run
    resumed_from: int = 0  # the steps it ran as a screening trial, paused, before it was run on (go_on)
    behind: bool = False  # ended at the screening's first rung, in the worse half: ranked after the better half
    stopped: bool = False  # a final stopped halfway, behind the first final there (fix's `_unless_behind`)
    own_loss: bool = False  # the loss mixes objectives (a GAN's G and D, meta `own_loss_steps`): its level says nothing
    process: "Process | None" = field(default=None, repr=False, compare=False)  # paused: its process, waiting

    @property
    def failed(self) -> bool:
        """The script exited with an error (see OUTPUT_LOG) before its budget or its own end: a
        trial that reaches the budget or the script's end exits 0."""
        return self.exit_code != 0

    def error_line(self) -> str:
        """The script's exception: the last line of its last lines that names one (a message that
        prints a tensor runs on below it: 'ValueError: ... found invalid values: tensor([...', whose
        last line was quoted, '(grad_fn=<ExpBackward0>))'); else its last line."""
        tail = [line.rstrip() for line in self.output_tail(40)]
        named = [line for line in tail if _EXCEPTION_LINE.match(line)]
        return (named[-1] if named else next((line for line in reversed(tail) if line.strip()), "")).strip()

    def output_tail(self, lines: int) -> list[str]:
        """The script's last lines of output (its error, when it failed)."""
        log = self.run_dir / OUTPUT_LOG
        return log.read_text(errors="replace").strip().splitlines()[-lines:] if log.is_file() else []

    @property
    def counted(self) -> list[Finding]:
        """The findings a change to the training could touch: not those only in layers no optimizer
        trains (a frozen body's dead ReLUs), which no remedy is for and no trial should be ranked by."""
        return [f for f in self.findings if not self._untouchable(f)]

    @property
    def frozen_only(self) -> list[Finding]:
        """The findings left out of `counted`: said, not ranked."""
        return [f for f in self.findings if self._untouchable(f)]

    def _untouchable(self, finding: Finding) -> bool:
        """In untrained layers only, and its numbers name no trained one: an activation module
        shared by every layer (`self.act` after each) is recorded where it first runs, before a
        frozen first layer, yet its dead units cut the gradient of the trained ones after it
        (evidence `zero_gradient_layers`)."""
        if not finding.layers or not set(finding.layers) <= self.untrained:
            return False
        named = {x for v in finding.evidence.values() for x in (v if isinstance(v, (list, tuple)) else [v])
                 if isinstance(x, str)}
        return not named & self.trained

    @property
    def blocking(self) -> list[Finding]:
        """The counted findings that stand in the way of training: not those the diagnosis itself
        rates "info" (units saturated while the loss still fell, a short memory the task did not need)."""
        return [f for f in self.counted if f.severity != "info"]

    @property
    def harmful(self) -> list[str]:
        """The harmful findings left, and NO_PROGRESS when the loss ended no lower than it began: a
        network that does not learn is not repaired, however healthy its gradients look. Not for a
        loss that mixes objectives (a GAN's sits at its equilibrium whether the generator learns or not)."""
        kinds = {f.kind for f in self.blocking if f.kind in HARMFUL}
        # (above twice the first loss, before any update, is no fall either: Adagrad at lr 3 went
        # 2.47, 65370, 160514 in a screening's first tenth and ended at 276, and was counted a repair)
        if not self.own_loss and np.isfinite(self.final_loss) and (self.final_loss >= self.first_loss
                                                                  or self.start_loss > 0 and self.final_loss > 2 * self.start_loss):
            kinds.add(NO_PROGRESS)
        return sorted(kinds)

    @property
    def works(self) -> bool:
        """It trained, did not break the script, left no harmful finding and kept a finite loss."""
        return self.steps > 0 and not self.failed and not self.harmful and self.final_loss != float("inf")

    @property
    def score(self) -> tuple:
        """Lower is better: a finite loss, then the harmful findings left, then the loss reached,
        then any finding left. A trial whose loss went non-finite is behind every one that kept
        it finite, whatever it left: ended early, it had no time to show the other findings."""
        if self.steps == 0 or self.failed:  # crashed: behind every trial that ran its course, the longest first
            return (2, -self.steps, float("inf"), 0)
        loss = self.final_loss if np.isfinite(self.final_loss) else float("inf")
        return (int(loss == float("inf")), len(self.harmful), loss, len(self.counted))


def final_loss(loss: np.ndarray) -> float:
    """The median of the last tenth of the recorded losses (inf once the loss is non-finite)."""
    recorded = loss[~np.isnan(loss)]
    if len(recorded) == 0:
        return float("inf")
    if np.isinf(recorded).any():
        return float("inf")
    return float(np.median(last_tenth(recorded)))


def _ended_skipped(series) -> bool:
    """The run's last STOP_AFTER_NON_FINITE iterations or more all skipped by a GradScaler (NaN/Inf
    at every scale), after its last stored step: a remedy trial is stopped there, on a loss that
    stayed non-finite, yet its stored losses, the steps that were taken, are finite. A reviewer's
    "ZClip + Adam repairs the run" was such a trial, its forward overflowing as the baseline's."""
    return skipped_after_last(series) >= STOP_AFTER_NON_FINITE


def last_tenth(losses: np.ndarray) -> np.ndarray:
    """The losses `final_loss` and `final_error` are taken over: the last tenth, at least one."""
    return losses[-max(1, len(losses) // 10):]


def final_error(loss: np.ndarray, robust: bool = True) -> float:
    """The standard error of `final_loss`, the median of the last tenth: 1.2533·s/√n for n losses of
    scale s (the median's large-sample error); nan for fewer than 2 or a non-finite one. Batch-to-
    batch noise and a trend within the window both widen it. s is robust, 1.4826·MAD (the standard
    deviation for normal noise), as the median is: a tester's exploding baseline, its last losses
    holding bursts of 1e6, had an error of 6.7e4 by the standard deviation, which hid a remedy 10x
    lower; a partial accumulation step at every epoch's end (its loss half a full step's) hid
    another 11 standard errors ahead. (The standard deviation where most losses are equal: MAD 0,
    or not `robust`: the wider error the decisions to stop a remedy take, `Trial.spread_error`.)"""
    recorded = loss[~np.isnan(loss)]
    last = last_tenth(recorded)
    if len(last) < 2 or not np.isfinite(last).all():
        return float("nan")
    mad = float(np.median(np.abs(last - np.median(last)))) if robust else 0.0
    scale = 1.4826 * mad if mad > 0 else float(np.std(last, ddof=1))
    return float(1.2533 * scale / np.sqrt(len(last)))


def lower_beyond_noise(trial: Trial, other: Trial, z: float = 2.0, error: str = "final_error") -> bool:
    """`trial` ended lower than `other` by more than `z` standard errors of the difference of their
    final losses (about 95%): a lower loss within the noise of the batches says nothing (an error
    counts 0 where it was not measured). `error`: the attribute read, "spread_error" for a decision
    to stop a remedy."""
    error = float(np.hypot(np.nan_to_num(getattr(trial, error)), np.nan_to_num(getattr(other, error))))
    return trial.final_loss < other.final_loss - z * error


def first_loss(loss: np.ndarray) -> float:
    """The median of the first tenth of the recorded losses, as `final_loss` takes the last."""
    recorded = loss[np.isfinite(loss)]
    return float(np.median(recorded[:max(1, len(recorded) // 10)])) if len(recorded) else float("nan")


# Fewer losses than this after the last change of phase or optimizer say too little of its start:
# the whole run's first losses are taken instead.
MIN_PHASE_STEPS = 10


def last_phase(series: RunSeries) -> int:
    """The step the run's last phase began at: a new model trained (meta `phase_starts`), or the
    optimizer that stepped before stopped (`optimizer_stopped`: a fine-tuning's SGD after a
    pretraining's Adam, on a model sharing its encoder). Whether the loss fell is judged within it:
    a pretraining's MSE at 0.25 against a fine-tuning's cross-entropy at 1.1 said "did not fall" of
    a fine-tuning that had fallen from 2.3."""
    for start in sorted(phase_changes(series.meta), reverse=True):
        if (series.steps >= start).sum() >= MIN_PHASE_STEPS:
            return start
    return int(series.steps[0]) if len(series.steps) else 0


def untrained_layers(series: RunSeries) -> frozenset[str]:
    """The layers no optimizer trains, so no change to the training can touch what is found there:
    weight layers held by no optimizer that steps (or only in groups at lr 0: meta
    `outside_optimizers`), and activations with no trained weight layer running before them, whose
    input nothing trains (a body frozen by `requires_grad_(False)` is not recorded at all: its
    activations run before the first recorded weight layer). A weight layer frozen from some step on
    (`optimizer_stopped`) was trained before it, and counts as trained."""
    outside = set(series.meta.get("outside_optimizers") or [])
    trained = [l.index for l in series.layers if l.role in WEIGHT_ROLES and l.name not in outside]
    first = min(trained, default=None)
    acts = {l.name for l in series.layers if l.role == "activation" and first is not None and l.index < first}
    return frozenset(outside | acts) if first is not None else frozenset()


REMEDY_FILE = "remedy.json"
LOCATE = "locate"  # the run directory of the baseline run again, to find where its NaN/Inf is made
OUTPUT_LOG = "output.log"  # the script's own output, kept apart from ours
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]*\.)?\w*(Error|Exception|Exit|Interrupt|Group)\b")


def prepare(run_dir: Path, candidate: Candidate) -> Path:
    """A fresh run directory that says which remedy its trial ran (`runs/fix/screen-3` alone does not)."""
    run_dir = runner.prepare_run_dir(run_dir)
    shutil.rmtree(run_dir / WRITTEN, ignore_errors=True)  # an earlier fix's
    (run_dir / NOT_APPLIED).unlink(missing_ok=True)
    (run_dir / ORIGIN).unlink(missing_ok=True)
    (run_dir / PROGRESS).unlink(missing_ok=True)
    (run_dir / BUDGET_REACHED).unlink(missing_ok=True)
    (run_dir / STOPPED_NON_FINITE).unlink(missing_ok=True)
    (run_dir / WROTE).unlink(missing_ok=True)
    (run_dir / REMEDY_FILE).write_text(json.dumps(
        {"name": candidate.name, "spec": candidate.spec, "code": candidate.code}, indent=1) + "\n")
    return run_dir


def discard_trials(out: Path) -> None:
    """Remove the trial directories an earlier fix left in `out` (a run with more candidates left
    more of them), so that every screen-N / trial-N there is this run's. Only gradwatch's own
    files go; a directory holding anything else is kept."""
    for run_dir in [*out.glob("screen-*"), *out.glob("trial-*"), out / LOCATE]:
        if not (run_dir / REMEDY_FILE).is_file():
            continue
        runner.clear_run(run_dir)
        shutil.rmtree(run_dir / WRITTEN, ignore_errors=True)
        for name in (REMEDY_FILE, OUTPUT_LOG, NOT_APPLIED, ORIGIN, PROGRESS, BUDGET_REACHED, STOPPED_NON_FINITE):
            (run_dir / name).unlink(missing_ok=True)
        try:
            run_dir.rmdir()
        except OSError:
            pass


def run_trial(command: list[str], run_dir: Path, candidate: Candidate, budget_steps: int,
              options: dict[str, int] | None = None, timeout: float | None = None,
              locate_at: int | None = None, say: Callable[[str], None] | None = None,
              pause: bool = False) -> Trial:
    """`locate_at`: check that step's operations for the one that makes a NaN/Inf (locate.py);
    `say`: told how far the trial has come every HEARTBEAT seconds while it runs; `pause`: at the
    budget, the process waits to be run further (`go_on`) or ended (`end_paused`), measured meanwhile
    (`Trial.process`), where it can (pause.py; else it ends there)."""
    run_dir = prepare(run_dir, candidate)
    env = runner.child_env(run_dir, options or {})
    env[ENV_MAX_STEPS] = str(budget_steps)
    env[ENV_WRITES] = str((run_dir / WROTE).resolve())  # (what it writes is put back: touched.py)
    if candidate.spec:
        env[ENV_REMEDY] = json.dumps(candidate.spec)
    if locate_at is not None:
        env[ENV_LOCATE_AT] = str(locate_at)
    channel = Channel() if pause and os.name == "posix" else None  # (pipes passed to a child: POSIX)
    if channel is not None:
        env.update(channel.env())
    log = open(run_dir / OUTPUT_LOG, "wb")
    try:
        # no input: its prompt would go to the log, unseen, and the trial wait for the terminal forever
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                pass_fds=channel.child_fds if channel is not None else ())
    except OSError as exc:
        log.close()
        if channel is not None:
            channel.started()
            channel.close()
        raise ConfigError(f"cannot start {command[0]!r}: {exc.strerror}") from exc
    if channel is not None:
        channel.started()
    return Process(proc, log, channel, run_dir, say).run(candidate, budget_steps, timeout)


def go_on(trial: Trial, budget_steps: int, timeout: float | None = None, pause: bool = False) -> Trial:
    """A paused trial run on to `budget_steps`, then ended and measured (`pause`: paused there
    again): the steps it had run are not run again (`Trial.resumed_from`)."""
    process, trial.process = trial.process, None
    process.channel.go_on(budget_steps)
    process.since = trial.steps
    final = process.run(trial.candidate, budget_steps, timeout, ran_for=trial.seconds, end_at_pause=not pause)
    final.resumed_from = trial.steps
    return final


def end_paused(trial: Trial) -> None:
    """End a paused trial as its budget would have (its measurement stands)."""
    if trial.process is not None:
        process, trial.process = trial.process, None
        process.end()


HEARTBEAT = 60.0  # seconds between two lines saying how far a running trial has come
ENDING = 60.0  # seconds a paused trial told to stop has to store its steps and exit, before it is killed


class Process:
    """A trial's process, from its start to its end, across its pauses."""

    def __init__(self, proc: subprocess.Popen, log, channel: Channel | None, run_dir: Path,
                 say: Callable[[str], None] | None) -> None:
        self.proc, self.log, self.channel, self.run_dir, self.say = proc, log, channel, run_dir, say
        self.since = 0  # the step it was run on from (go_on): the pace is that of the steps since

    def run(self, candidate: Candidate, budget_steps: int, timeout: float | None, ran_for: float = 0.0,
            end_at_pause: bool = False) -> Trial:
        """Wait until it pauses (a Trial measured then, holding this process) or ends (measured)."""
        start = time.perf_counter()
        try:
            code = self._wait(budget_steps, timeout)
            if code is None and end_at_pause:
                self.channel.stop()
                code = self._exit_code(ENDING)
        except BaseException:  # Ctrl-C, SIGTERM: the trial goes with fix
            self.kill()
            raise
        seconds = ran_for + time.perf_counter() - start
        if code is None:
            trial = measure(Trial(candidate, self.run_dir, 0, seconds))
            trial.process = self
            return trial
        self._finish(code)
        return measure(Trial(candidate, self.run_dir, code, seconds))

    def end(self) -> None:
        self.channel.stop()
        self._finish(self._exit_code(ENDING))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close()

    def _exit_code(self, within: float) -> int:
        try:
            return self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def _finish(self, code: int) -> None:
        self._close()
        runner.finish_run(self.run_dir, runner.exit_status(code))

    def _close(self) -> None:
        """fix's ends of the pipes, and the script's log."""
        if self.channel is not None:
            self.channel.close()
        self.log.close()

    def _wait(self, budget_steps: int, timeout: float | None) -> int | None:
        """The trial's exit code (-9 when killed after `timeout` seconds), or None once it has paused.
        Every HEARTBEAT seconds, `say` hears the steps done so far and the time the rest will take at
        that pace: a script at 20 s a step left fix silent for 13 minutes."""
        start = time.monotonic()
        while True:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                self.proc.kill()
                self.proc.wait()
                return -9
            beat = HEARTBEAT if left is None else min(HEARTBEAT, left)
            if self.channel is not None:
                if self.channel.paused_at(self.proc, beat) is not None:
                    return None
                if self.proc.poll() is not None:
                    return self.proc.returncode
            else:
                try:
                    return self.proc.wait(beat)
                except subprocess.TimeoutExpired:
                    pass
            if self.say is not None and (left is None or left > beat):
                self.say(_how_far(self.run_dir, budget_steps, time.monotonic() - start, self.since))


def _how_far(run_dir: Path, budget_steps: int, seconds: float, since: int = 0) -> str:
    """`seconds`: since the trial started, or was run on from step `since`."""
    try:
        done = int((run_dir / PROGRESS).read_text())
    except (OSError, ValueError):
        done = 0
    pace = seconds / (done - since) if done > since else 0.0
    rest = f", about {_duration(pace * (budget_steps - done))} more at this pace" if pace else ""
    return f"gradwatch fix:   {run_dir.name}: {done} of {budget_steps} steps after {_duration(seconds)}{rest}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_trial_in_process(train_fn: Callable[[], object], run_dir: Path, candidate: Candidate,
                         budget_steps: int, seed: int = 0, trained: list[weakref.ref] | None = None,
                         locate_at: int | None = None) -> Trial:
    """The same trial for a function in this process (`gw.fix(train_fn)`): the same hooks,
    installed around one call, then removed; torch's RNG is seeded alike for every trial.
    `trained`: the models earlier trials trained; one trained again is a ConfigError (the
    function must build its own, or every trial after the first starts from another's weights)."""
    from gradwatch.collect.auto import AutoWatch

    run_dir = prepare(run_dir, candidate)
    torch.manual_seed(seed)
    trained = [] if trained is None else trained
    injector = Injector(candidate.spec, budget_steps, trained, run_dir=run_dir, locate_at=locate_at)
    watch = AutoWatch(str(run_dir), warn=False, status=False)
    injector.install_late()
    start, code = time.perf_counter(), 0
    try:
        train_fn()
    except SystemExit as stop:  # the budget was reached
        code = stop.code if isinstance(stop.code, int) else 0
    except ConfigError:
        raise
    except Exception:  # the remedy broke the function: this trial failed, not fix
        code = 1
        (run_dir / OUTPUT_LOG).write_text(traceback.format_exc())
    finally:
        injector.remove()
        watch.detach()
        runner.finish_run(run_dir, code)
        if injector.model is not None:
            trained.append(weakref.ref(injector.model))
    return measure(Trial(candidate, run_dir, code, time.perf_counter() - start))


def measure(trial: Trial) -> Trial:
    run_dir = trial.run_dir
    if (run_dir / NOT_APPLIED).is_file():
        trial.not_applied = (run_dir / NOT_APPLIED).read_text().strip()
    trial.cut = (run_dir / BUDGET_REACHED).is_file()
    try:
        series = read_run(run_dir, compact=True)  # (as diagnose reads a store: its metrics only go to the rules)
    except GradwatchError:
        return trial  # nothing recorded: the script failed before its first step
    trial.steps = len(series.steps)
    trial.own_loss = bool(series.meta.get("own_loss_steps"))
    stopped = _ended_skipped(series) or (run_dir / STOPPED_NON_FINITE).is_file()
    trial.final_loss = float("inf") if stopped else final_loss(series.loss)
    trial.final_error = final_error(series.loss)
    trial.spread_error = final_error(series.loss, robust=False)
    phase = series.loss[(series.steps >= last_phase(series)) & np.isfinite(series.loss)]
    trial.first_loss = first_loss(phase)
    trial.start_loss = float(phase[0]) if len(phase) else float("nan")
    trial.findings = diagnose(series)
    trial.untrained = untrained_layers(series)
    trial.trained = frozenset(l.name for l in series.layers if l.role in WEIGHT_ROLES) - trial.untrained
    write_findings(run_dir, trial.findings)
    return trial
