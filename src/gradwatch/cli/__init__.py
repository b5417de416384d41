"""Command-line entry point; see `gradwatch --help`."""

import os
import sys
import time

PATIENCE = 2.0  # seconds of reading before its progress is said: a short read says nothing


def say(text: str) -> None:
    """One line of progress on stderr, so stdout keeps only the result."""
    print(f"gradwatch: {text}", file=sys.stderr, flush=True)


def say_which_store(run: str | os.PathLike) -> None:
    """A run of several stores (every rank's under `all_ranks`, a spawned worker's) is shown from its
    main one, rank 0's: said, with how to see another (silently rank 0 before)."""
    from gradwatch.store import store_files

    files = store_files(run)
    if len(files) > 1:
        say(f"{os.fspath(run)} holds {len(files)} stores: showing {files[0].name}; give another's file to see "
            f"it, e.g. {os.fspath(files[1])}")


class Reading:
    """A `read_run` progress that says each tenth of a long read (a 50k-step x 480-layer store takes
    two minutes, in silence before), from PATIENCE seconds into it on. `spoke`: whether it did, so
    the stage after a long read is said too."""

    def __init__(self, run: object):
        self.run, self.start, self.said = run, time.monotonic(), 0  # tenths said so far

    @property
    def spoke(self) -> bool:
        return self.said > 0

    def __call__(self, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth > self.said and time.monotonic() - self.start >= PATIENCE:
            say(f"reading {self.run}: {done:,} of {total:,} steps")
            self.said = tenth
