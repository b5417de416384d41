"""gradwatch lab: the classic vanishing/exploding-gradient experiments, seeded, measured with
gradwatch's own watch (and probe, remedies, diagnose), each checking its claim (docs/lab.md)."""

from gradwatch.lab.base import Check, Experiment, Result
from gradwatch.lab.experiments import NAMES, all_experiments, get
from gradwatch.lab.runner import run_many, run_one

__all__ = ["Experiment", "Result", "Check", "NAMES", "get", "all_experiments", "run_one", "run_many"]
