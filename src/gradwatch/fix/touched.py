"""Which files the trials wrote: `fix` never edits the user's files, but the script it runs may write
its own outputs (a checkpoint, a log) on every trial, and the user should hear that they now hold a
trial's, not their run's."""

from __future__ import annotations

import os
from pathlib import Path

MAX_ENTRIES = 5000  # a data directory of millions of files is not worth walking
SKIP = {".git", ".hg", ".svn", ".venv", "venv", "__pycache__", "node_modules"}


def snapshot(root: Path, exclude: Path, depth: int = 2) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of the files under `root`, `depth` levels deep, outside `exclude`."""
    seen: dict[str, tuple[int, int]] = {}
    exclude = exclude.resolve()
    if root.resolve() == exclude or exclude in root.resolve().parents:
        return seen  # the trials write here themselves: their files cannot be told from the script's
    stack = [(root, 0)]
    while stack and len(seen) < MAX_ENTRIES:
        folder, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if level + 1 < depth and entry.name not in SKIP and path.resolve() != exclude:
                        stack.append((path, level + 1))
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    seen[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
            except OSError:
                continue
    return seen


def written(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Files created or changed between the two snapshots, sorted."""
    return sorted(p for p, stat in after.items() if before.get(p) != stat)
