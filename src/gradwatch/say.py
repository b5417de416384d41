"""`say`: one line of gradwatch's own on stderr, clear of the script's progress bar."""

from __future__ import annotations

import contextlib
import sys


def say(text: str) -> None:
    """A line on stderr; none with stderr closed (print would write it to the script's stdout).
    Through tqdm where a bar is live: printed plainly, the line went on from the bar's
    ("49/200 [00:00<00:02, 69.81it/s, loss=1.41]gradwatch: [error] ..."), and the bar redrawn over it."""
    if sys.stderr is None:
        return
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    if bars is not None and getattr(bars, "_instances", None):
        with contextlib.suppress(Exception):
            bars.write(text, file=sys.stderr)
            return
    print(text, file=sys.stderr)
