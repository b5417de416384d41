"""`say`: one line of gradwatch's own on stderr, clear of the script's progress bar."""

from __future__ import annotations

import contextlib
import sys


def say(text: str) -> None:
    """A line on stderr; none with stderr closed (print would write it to the script's stdout).
    Through tqdm where a bar is live on stderr: printed plainly, the line went on from the bar's
    ("49/200 [00:00<00:02, 69.81it/s, loss=1.41]gradwatch: [error] ..."), and the bar redrawn over it."""
    if sys.stderr is None:
        return
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    if bars is not None and _bar_on_stderr(bars):
        with contextlib.suppress(Exception):
            bars.write(text, file=sys.stderr)
            return
    print(text, file=sys.stderr)


def _bar_on_stderr(bars: type) -> bool:
    """A live bar drawn on stderr. Not one on stdout: tqdm.write clears and redraws every bar on
    stdout or stderr (they share the terminal), which put those lines in the script's own stdout
    (130 lines where 124), piped to a file. (A bar's `fp` wraps its file, and compares as it.)"""
    with contextlib.suppress(Exception):  # (the set changes as bars close, in other threads too)
        return any(getattr(bar, "fp", None) == sys.stderr for bar in list(getattr(bars, "_instances", ())))
    return False
