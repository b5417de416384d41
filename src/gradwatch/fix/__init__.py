"""fix: try remedies on the user's own training in short trials and say, measured, which works.

A baseline trial is diagnosed; candidate remedies are built from its findings and each is run for
the same budget of steps through the zero-code hooks (the user's files are never changed); the
trials are ranked by the harmful findings they leave, then by the loss they reach.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gradwatch.errors import ConfigError
from gradwatch.fix.candidates import Candidate, autotrainer_order, from_findings
from gradwatch.fix.trial import Trial, run_trial, run_trial_in_process
from gradwatch.store import read_run

BASELINE = Candidate("baseline (no change)")


@dataclass
class FixResult:
    baseline: Trial
    trials: list[Trial]

    @property
    def ranked(self) -> list[Trial]:
        return sorted(self.trials, key=lambda t: t.score)

    @property
    def winner(self) -> Trial | None:
        """The best trial if it beats the baseline, else None."""
        best = self.ranked[0] if self.trials else None
        return best if best is not None and best.score < self.baseline.score else None

    @property
    def repaired(self) -> bool:
        w = self.winner
        return w is not None and not w.harmful and w.final_loss != float("inf")

    @property
    def cost_steps(self) -> int:
        return sum(t.steps for t in [self.baseline, *self.trials])


def fix(command: list[str] | Callable[[], object], *, out: str | os.PathLike = "runs/fix", budget_steps: int = 200,
        candidates: list[Candidate] | None = None, order: str = "gradwatch", stop_at_first: bool = False,
        progress: Callable[[str], None] | None = None, timeout: float | None = None) -> FixResult:
    """Run `command` (argv of a training process, or a function that trains in this process) as
    a baseline and with each candidate remedy.

    `order="gradwatch"` builds candidates from the baseline's findings; `"autotrainer"` replays
    AutoTrainer's fixed order. `stop_at_first` ends at the first trial that leaves no harmful
    finding (what AutoTrainer does); otherwise every candidate is tried and ranked.
    """
    if not isinstance(budget_steps, int) or budget_steps < 1:
        raise ConfigError(f"budget_steps={budget_steps!r}: expected a whole number >= 1")
    if order not in ("gradwatch", "autotrainer"):
        raise ConfigError(f"order={order!r}: expected 'gradwatch' or 'autotrainer'")
    say = progress or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)

    def trial(name: str, cand: Candidate) -> Trial:
        if callable(command):
            return run_trial_in_process(command, out / name, cand, budget_steps)
        return run_trial(command, out / name, cand, budget_steps, timeout=timeout)

    say(f"gradwatch fix: baseline trial ({budget_steps} steps)")
    baseline = trial("baseline", BASELINE)
    if baseline.steps == 0:
        raise ConfigError(f"the baseline run recorded no training step (exit code {baseline.exit_code}); "
                          f"see {out / 'baseline' / 'output.log'}")
    if candidates is None:
        if order == "autotrainer":
            candidates = autotrainer_order(baseline.findings)
        else:
            acts = {l.activation for l in read_run(baseline.run_dir).layers if l.role == "activation"}
            candidates = from_findings(baseline.findings, acts)
    trials = []
    for i, cand in enumerate(candidates, 1):
        say(f"gradwatch fix: trial {i}/{len(candidates)}: {cand.name}")
        result = trial(f"trial-{i}", cand)
        trials.append(result)
        if stop_at_first and result.steps and not result.harmful and result.final_loss != float("inf"):
            break
    return FixResult(baseline, trials)


__all__ = ["fix", "FixResult", "Trial", "Candidate"]
