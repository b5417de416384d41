"""Command-line entry point; see `gradwatch --help`."""

import sys


def say(text: str) -> None:
    """One line of progress on stderr, so stdout keeps only the result."""
    print(f"gradwatch: {text}", file=sys.stderr, flush=True)
