"""Errors a user can cause. The CLI prints their message and exits non-zero, no traceback."""

import difflib
import textwrap


class GradwatchError(Exception):
    """Base class: the message names the bad value and the fix."""


class StoreError(GradwatchError):
    """A run directory or store file is missing, unreadable or not a gradwatch store."""


class ConfigError(GradwatchError):
    """An argument has a value gradwatch cannot use."""


class TrainingStopped(GradwatchError):
    """Raised from inside training by `watch(..., stop_on=...)`: a finding the user asked to stop on
    appeared. The store is flushed before it is raised."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for a typo or a unique prefix of one of `choices`, else '': for the
    message of an unknown name (a command, an option, a lab experiment)."""
    choices = list(choices)
    prefixed = [c for c in choices if c.startswith(word)]
    close = prefixed if len(prefixed) == 1 else difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def first_line(error: BaseException, width: int = 120) -> str:
    """`ValueError: bad batch`: an exception as one line for a stored event or note, its message's
    first line shortened to `width` (a traceback's worth of text does not fit in one)."""
    lines = str(error).strip().splitlines()
    name = type(error).__name__
    return f"{name}: {textwrap.shorten(lines[0], width, placeholder=' ...')}" if lines else name
