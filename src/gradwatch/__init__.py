"""gradwatch: vanishing and exploding gradients, made visible, explained, predicted and fixed."""

from gradwatch.collect import Watch, watch
from gradwatch.diagnose import Finding, Thresholds, diagnose
from gradwatch.errors import ConfigError, GradwatchError, StoreError, TrainingStopped
from gradwatch.fix import FixResult, fix
from gradwatch.probe import ProbeResult, probe
from gradwatch.remedies import check_constant_init, clip, guard, init_, modify
from gradwatch.store import RunSeries, read_run

__version__ = "0.1.0"

__all__ = ["watch", "Watch", "diagnose", "Finding", "Thresholds", "read_run", "RunSeries", "GradwatchError", "ConfigError", "StoreError",
           "TrainingStopped",
           "clip", "guard", "init_", "check_constant_init", "modify", "probe", "ProbeResult", "fix", "FixResult"]
