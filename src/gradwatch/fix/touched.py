"""The files the trials write: `fix` never edits the user's files, but the script it runs may write
its own (a checkpoint saved each epoch and loaded at start if present, a log). Left in place, each
trial would start from what the one before wrote — and a trial that inserted BatchNorm leaves a
checkpoint no later trial can load. So the working directory is put back after every trial."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MAX_ENTRIES = 5000  # a data directory of millions of files is not worth walking
BACKUP_LIMIT = 512 * 2**20  # bytes of the user's files copied aside before the baseline, at most
WRITTEN = "written"  # in a trial's directory: the files the script wrote during that trial
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


class Workspace:
    """The working directory as it was before `fix`: its files (two levels deep) are copied aside
    first, up to BACKUP_LIMIT bytes. After each trial, `settle` moves the files the script created
    into the trial's directory and puts back those it changed or deleted, so every trial starts
    from what the baseline started from, and the user finds the directory as they left it."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.backup = root, out / ".originals"
        self.exclude = out
        self.notice = ""
        if self.backup.exists():  # an earlier fix was killed before it put the directory back
            kept = out / ".originals-interrupted"
            shutil.rmtree(kept, ignore_errors=True)
            self.backup.rename(kept)
            self.notice = (f"an earlier fix in {out} was killed before it put your files back: their copies "
                           f"from before it are in {kept}")
        self.before = snapshot(root, out)
        self.restorable = sum(size for _, size in self.before.values()) <= BACKUP_LIMIT
        self.written: set[str] = set()
        self.overwritten: set[str] = set()  # changed by a trial and not restorable (too much to copy)
        if self.restorable and self.before:
            for rel in self.before:
                _copy(root / rel, self.backup / rel)

    def settle(self, trial_dir: Path) -> None:
        now = snapshot(self.root, self.exclude)
        changed = written(self.before, now) + sorted(set(self.before) - set(now))
        for rel in changed:
            self.written.add(rel)
            if rel not in self.before:  # the trial's own output: kept with the trial
                target = trial_dir / WRITTEN / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(self.root / rel, target)
            elif self.restorable:
                _copy(self.backup / rel, self.root / rel)
            else:
                self.overwritten.add(rel)

    def close(self) -> None:
        shutil.rmtree(self.backup, ignore_errors=True)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)  # with its mtime, so a restored file compares equal to the snapshot
