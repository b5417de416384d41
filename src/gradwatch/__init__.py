"""gradwatch: vanishing and exploding gradients, made visible, explained, predicted and fixed.

The public names load on first use (PEP 562), so `gradwatch --help` and the parent process of
`gradwatch run` do not pay torch's import time; `import gradwatch as gw; gw.watch(...)` is unchanged.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from gradwatch.errors import ConfigError, GradwatchError, StoreError, TrainingStopped

__version__ = "0.1.0"

_LAZY = {
    "watch": "gradwatch.collect.watch", "Watch": "gradwatch.collect.watch",
    "diagnose": "gradwatch.diagnose", "Finding": "gradwatch.diagnose", "Thresholds": "gradwatch.diagnose",
    "fix": "gradwatch.fix", "FixResult": "gradwatch.fix",
    "probe": "gradwatch.probe", "ProbeResult": "gradwatch.probe",
    "clip": "gradwatch.remedies", "guard": "gradwatch.remedies", "init_": "gradwatch.remedies",
    "check_constant_init": "gradwatch.remedies", "modify": "gradwatch.remedies",
    "read_run": "gradwatch.store", "RunSeries": "gradwatch.store",
}

__all__ = ["watch", "Watch", "diagnose", "Finding", "Thresholds", "read_run", "RunSeries", "GradwatchError", "ConfigError", "StoreError",
           "TrainingStopped",
           "clip", "guard", "init_", "check_constant_init", "modify", "probe", "ProbeResult", "fix", "FixResult"]

if TYPE_CHECKING:
    from gradwatch.collect.watch import Watch, watch
    from gradwatch.diagnose import Finding, Thresholds, diagnose
    from gradwatch.fix import FixResult, fix
    from gradwatch.probe import ProbeResult, probe
    from gradwatch.remedies import check_constant_init, clip, guard, init_, modify
    from gradwatch.store import RunSeries, read_run


class _Package(types.ModuleType):
    """Importing the subpackage `gradwatch.fix` would set `gradwatch.fix` to it, hiding the function
    `fix` (likewise `diagnose`, `probe`); the eager imports this replaces rebound the name at once."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return  # the function stays, or is loaded at its first access
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
