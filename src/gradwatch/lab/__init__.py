"""gradwatch lab: the classic vanishing/exploding-gradient experiments, seeded, measured with
gradwatch's own watch (and probe, remedies, diagnose), each checking its claim (docs/lab.md).

`run_one` and `run_many` load torch and matplotlib on first use: `gradwatch --help` names the
experiments without them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch.lab.base import Check, Experiment, Result
from gradwatch.lab.experiments import NAMES, all_experiments, get

if TYPE_CHECKING:
    from gradwatch.lab.runner import run_many, run_one

__all__ = ["Experiment", "Result", "Check", "NAMES", "get", "all_experiments", "run_one", "run_many"]


def __getattr__(name: str) -> Any:
    if name not in ("run_one", "run_many"):
        raise AttributeError(f"module 'gradwatch.lab' has no attribute {name!r}")
    from gradwatch.lab import runner

    return getattr(runner, name)
