"""diagnose: pure functions from a run's series to `Finding`s (what is wrong, where, since when,
why, and what to change). No torch needed: rules read a `RunSeries`."""

from __future__ import annotations

import os

from gradwatch.diagnose.finding import KINDS, Finding, Remedy
from gradwatch.errors import ConfigError
from gradwatch.diagnose.rules import RULES
from gradwatch.diagnose.thresholds import DEFAULT, Thresholds
from gradwatch.store import RunSeries, read_run

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
LOSS_KINDS = ("loss_plateau", "loss_divergence")


def diagnose(run: RunSeries | str | os.PathLike, thresholds: Thresholds = DEFAULT) -> list[Finding]:
    """Findings of a run (a `RunSeries`, a run directory or a store file), earliest first.

    Stalled lower layers where a vanishing gradient was found are folded into it: one cause, one
    finding. A run that trained one model after another (meta "phase_starts") is diagnosed phase
    by phase: the jump from one model's loss to the next is no divergence.
    """
    if not isinstance(run, (RunSeries, str, os.PathLike)):
        raise ConfigError(f"run={run!r}: pass a run directory (e.g. 'runs/latest'), a store file or a RunSeries")
    series = run if isinstance(run, RunSeries) else read_run(run)
    if len(series.steps) == 0:
        return []
    starts = [int(s) for s in series.meta.get("phase_starts") or [] if s > series.steps[0]]
    phases = [series.between(a, b) for a, b in zip([int(series.steps[0]), *starts], [*starts, None])] \
        if starts else [series]
    findings = [f for phase in phases if len(phase.steps) for rule in RULES for f in rule(phase, thresholds)]
    if series.meta.get("own_loss_steps"):  # the recorded loss mixes two objectives (a GAN's G and D):
        findings = [f for f in findings if f.kind not in LOSS_KINDS]  # its plateau or rise says nothing
    vanished = {l for f in findings if f.kind == "vanishing_gradient" for l in f.layers}
    findings = [f for f in findings  # lower layers stalled where the gradient vanishes: one cause
                if not (f.kind == "stalled_layers" and not f.evidence.get("frozen") and set(f.layers) & vanished)]
    return sorted(findings, key=lambda f: (f.first_step, SEVERITY_ORDER[f.severity], KINDS.index(f.kind)))


__all__ = ["diagnose", "Finding", "Remedy", "Thresholds", "KINDS"]
