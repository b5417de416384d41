"""gradwatch: vanishing and exploding gradients, made visible, explained, predicted and fixed."""

from gradwatch.collect import Watch, watch
from gradwatch.errors import ConfigError, GradwatchError, StoreError
from gradwatch.store import RunSeries, read_run

__version__ = "0.1.0"

__all__ = ["watch", "Watch", "read_run", "RunSeries", "GradwatchError", "ConfigError", "StoreError"]
