"""Errors a user can cause. The CLI prints their message and exits non-zero, no traceback."""


class GradwatchError(Exception):
    """Base class: the message names the bad value and the fix."""


class StoreError(GradwatchError):
    """A run directory or store file is missing, unreadable or not a gradwatch store."""


class ConfigError(GradwatchError):
    """An argument has a value gradwatch cannot use."""


class TrainingStopped(GradwatchError):
    """Raised from inside training by `watch(..., stop_on=...)`: a finding the user asked to stop on
    appeared. The store is flushed before it is raised."""
