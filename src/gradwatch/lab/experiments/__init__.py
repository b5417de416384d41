"""The registry: one module per experiment, each exposing `EXPERIMENT`, in the order `lab list` shows."""

from __future__ import annotations

import importlib

from gradwatch.errors import ConfigError, did_you_mean
from gradwatch.lab.base import Experiment

NAMES = ("activations", "depth", "he30", "init", "lr", "clipping", "rnn", "batchnorm", "residual", "optimizers")


def get(name: str) -> Experiment:
    """The experiment called `name` (case does not matter: `HE30` is he30)."""
    if not isinstance(name, str) or name.lower() not in NAMES:
        hint = did_you_mean(str(name).lower(), NAMES)
        raise ConfigError(f"no lab experiment named {name!r}{hint}; choose one of {', '.join(NAMES)} "
                          "(the command also takes 'all' and 'list')")
    name = name.lower()
    return importlib.import_module(f"gradwatch.lab.experiments.{name}").EXPERIMENT


def all_experiments() -> list[Experiment]:
    return [get(n) for n in NAMES]
