"""The registry: one module per experiment, each exposing `EXPERIMENT`, in the order `lab list` shows."""

from __future__ import annotations

import importlib

from gradwatch.errors import ConfigError
from gradwatch.lab.base import Experiment

NAMES = ("activations", "depth", "he30", "init", "lr", "clipping", "rnn", "batchnorm", "residual", "optimizers")


def get(name: str) -> Experiment:
    if name not in NAMES:
        raise ConfigError(f"no lab experiment named {name!r}; choose one of {', '.join(NAMES)} (or 'all')")
    return importlib.import_module(f"gradwatch.lab.experiments.{name}").EXPERIMENT


def all_experiments() -> list[Experiment]:
    return [get(n) for n in NAMES]
