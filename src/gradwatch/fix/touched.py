"""The files the trials write: `fix` never edits the user's files, but the script it runs may write
its own (a checkpoint saved each epoch and loaded at start if present, a log). Left in place, each
trial would start from what the one before wrote — and a trial that inserted BatchNorm leaves a
checkpoint no later trial can load. So the working directory is put back after every trial."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # (Windows: no advisory locks; one fix at a time is the user's to keep)
    fcntl = None

DEPTH = 3  # the working directory and two levels below it (checkpoints/run1/ckpt.pt)
SOURCE = (".py", ".md", ".rst", ".ipynb")  # changed during a fix, the user's edits: a training script writes no code or prose
GRACE_S = 60  # a file changed this long after a killed fix's last write is the user's, not its trial's
MAX_ENTRIES = 20000  # a data directory of millions of files is not worth walking
BACKUP_LIMIT = 512 * 2**20  # bytes of the user's files copied aside before the baseline, at most
WRITTEN = "written"  # in a trial's directory: the files the script wrote during that trial
WROTE = "wrote.txt"  # in a trial's directory: the paths its processes opened for writing (_bootstrap `_note_writes`)
ENV_WRITES = "GRADWATCH_FIX_WRITES"  # that file's path, for the trial's processes (the same name in _bootstrap)
SQLITE_FILES = ("-wal", "-shm", "-journal")  # what SQLite writes beside a database, in C
BACKUP, INTERRUPTED, COMPLETE = ".originals", ".originals-interrupted", ".complete"
SKIP = {".git", ".hg", ".svn", ".venv", "venv", "__pycache__", "node_modules"}


@contextlib.contextmanager
def one_fix_at_a_time(root: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Held while a fix works in `root`: each fix puts the directory back after every trial, so a
    second one there would move the first's trial files away, take its baseline's writes for its
    own, and put back what the other had changed (a tester's two fixes in one directory each
    reported the other's run). The lock is a file of the system's temporary directory named for
    `root`, not one in it; the kernel drops it with its holder, so a killed fix leaves none. A second
    fix waits for the first, and says so."""
    if fcntl is None:
        yield
        return
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    fd = os.open(Path(tempfile.gettempdir()) / f"gradwatch-fix-{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            say(f"gradwatch fix: another fix (pid {owner}) is running in {str(root)!r}: its trials put the directory "
                "back after each one, so two at once would undo each other's; waiting for it to end (Ctrl-C stops)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def own_outputs() -> set[tuple[int, int]]:
    """(device, inode) of the files this process's stdout and stderr go to (`fix ... > fix.log`):
    they grow during the trials, and are gradwatch's own, never the script's to be put back."""
    found = set()
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def written_by_others(root: Path) -> set[tuple[int, int]]:
    """(device, inode) of the files under `root` open for writing in a process that is neither this
    one nor one it started: `gradwatch fix ... | tee fix.log`, the log of a command that runs fix.
    They grow during the trials, yet are no trial's: put back, they were moved away while their
    writer went on writing into the moved file (tee's log kept what it held before the fix). Read
    from /proc; where there is none, only this process's own outputs are known."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return set()
    parents, me = {}, os.getpid()
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
    prefix, found = os.path.join(str(root.resolve()), ""), set()  # ("/" itself: "/", not "//")
    for pid in parents:
        if _descends(pid, me, parents):
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(proc / str(pid) / "fd"):
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(fd.path).startswith(prefix) and _writable(pid, fd.name):
                        st = os.stat(fd.path)
                        found.add((st.st_dev, st.st_ino))
    return found


def _descends(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    """`pid` is `ancestor` or one of its descendants (a trial, or a process a trial started)."""
    for _ in range(len(parents) + 1):  # (a cycle cannot arise, but a pid reused mid-read could)
        if pid == ancestor:
            return True
        if pid not in parents or pid <= 1:
            return False
        pid = parents[pid]
    return False


def _writable(pid: int, fd: str) -> bool:
    """The descriptor was opened for writing (its flags' access mode, from fdinfo)."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return (int(line.split()[1], 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
    return False


@dataclass
class Snapshot:
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # (mtime_ns, size); symlinks too
    dirs: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)  # this process's outputs, files another writes: never put back
    complete: bool = True  # False: MAX_ENTRIES reached, or the directory lies inside `out`


def snapshot(root: Path, exclude: Path, depth: int = DEPTH) -> Snapshot:
    """The files (and symlinks, as links) under `root`, `depth` levels deep, outside `exclude` and
    other than this process's own output files; breadth first, so a huge data folder cannot hide
    the levels above it."""
    seen = Snapshot()
    ours = own_outputs() | written_by_others(root)
    exclude = exclude.resolve()
    if root.resolve() == exclude or exclude in root.resolve().parents:
        seen.complete = False  # the trials write here themselves: their files cannot be told apart
        return seen
    queue = deque([(root, 0)])
    while queue:
        folder, level = queue.popleft()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if len(seen.files) >= MAX_ENTRIES:
                seen.complete = False
                return seen
            path, rel = Path(entry.path), os.path.relpath(entry.path, root)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in SKIP and path.resolve() != exclude:
                        seen.dirs.add(rel)
                        if level + 1 < depth:
                            queue.append((path, level + 1))
                elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in ours:
                        seen.held.add(rel)
                    else:
                        seen.files[rel] = (st.st_mtime_ns, st.st_size)
            except OSError:
                continue
    return seen


def trial_writes(log: Path) -> Callable[[str], bool] | None:
    """Whether a path is one the trial wrote, removed or renamed, by the paths its processes noted
    (the folders too: what a removed tree held, a database's journal beside it); None where it
    noted nothing (no Python process of its own, a trial run in this process), or one of its
    processes started a program other than Python (`cp ckpt.pt last.pt`): then every change is
    taken for the trial's."""
    try:
        noted = log.read_text(errors="surrogateescape").splitlines()
    except OSError:
        return None
    if "*" in noted:  # it started a program other than Python, whose writes no hook noted
        return None
    paths, folders = set(noted), tuple(os.path.join(p, "") for p in noted)

    def wrote(path: str) -> bool:
        real = os.path.realpath(path)
        base = next((real[:-len(s)] for s in SQLITE_FILES if real.endswith(s)), real)
        return real in paths or base in paths or real.startswith(folders)
    return wrote


class Workspace:
    """The working directory as it was before `fix`: its files (three levels deep) are copied
    aside first, up to BACKUP_LIMIT bytes. After each trial, `settle` moves the files the script
    created into the trial's directory, removes the folders it created, and puts back the files
    it changed or deleted, so every trial starts from what the baseline started from, and the
    user finds the directory as they left it. A copy kept by a fix that was killed (SIGKILL)
    before it could put the directory back is used first, to do so."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out, self.backup = root, out, out / BACKUP
        self.notice = self._recover()
        self.before = snapshot(root, out)
        if not self.before.complete:
            limit = (f"more than {MAX_ENTRIES} files" if self.before.files else f"inside --out {out}")
            self.notice += ("; " if self.notice else "") + (
                f"the working directory holds {limit}: files the script writes there may not be put back "
                "between trials")
        self.restorable = sum(size for _, size in self.before.files.values()) <= BACKUP_LIMIT
        self.written: set[str] = set()
        self.overwritten: set[str] = set()  # changed by a trial and not restorable (too much to copy)
        self.edited: set[str] = set()  # source files the user changed during the fix, and files another program wrote, kept
        self.settled = True
        if self.restorable:
            for rel in self.before.files:
                _copy(root / rel, self.backup / rel)
            self.backup.mkdir(parents=True, exist_ok=True)
            (self.backup / COMPLETE).write_text("")

    def _recover(self) -> str:
        """An earlier fix was killed with the directory in a trial's state: put it back from that
        fix's copy, and keep the copy; the oldest copy kept is never replaced, it is the one from
        before any fix. What its trial left is kept too (files it created in created/, versions
        it changed in replaced/), and what the user changed since (GRACE_S after the killed fix's
        last write, or any source file) stays as it is now."""
        if not (self.backup / COMPLETE).exists():  # stopped while copying: no trial had run yet
            shutil.rmtree(self.backup, ignore_errors=True)
            return ""
        last = max(_last_write(self.out), (self.backup / COMPLETE).stat().st_mtime_ns)
        kept = self.out / INTERRUPTED
        source = self.backup
        if not kept.exists():  # else keep the earlier copy: the one from before any fix
            self.backup.rename(kept)
            source = kept
        originals = {str(p.relative_to(source)): p for p in source.rglob("*")  # (before anything moves in)
                     if (p.is_file() or p.is_symlink()) and str(p.relative_to(source)) != COMPLETE}
        now = snapshot(self.root, self.out)
        users = sorted(rel for rel, (mtime, _) in now.files.items()
                       if mtime > last + GRACE_S * 10**9 or rel.endswith(SOURCE))
        for rel in sorted(set(now.files) - set(originals) - set(users)):
            _move(self.root / rel, kept / "created" / rel)
        for rel, copy in originals.items():
            if rel in users or _same(copy, self.root / rel):
                continue
            if rel in now.files:
                _move(self.root / rel, kept / "replaced" / rel)
            _copy(copy, self.root / rel)
        shutil.rmtree(self.backup, ignore_errors=True)
        said = (f"an earlier fix in {self.out} was killed before it put your files back; they are back now, "
                f"and the copies it took are kept in {kept}")
        changed = [rel for rel in users if not (rel in originals and _same(originals[rel], self.root / rel))]
        if changed:
            said += f"; changed since, and left as they are: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}"
        return said

    def settle(self, trial_dir: Path) -> bool:
        """After a trial: its new files go to the trial's directory, the files it changed are put
        back (the trial's versions kept beside its new files), its folders are removed. A source
        file changed or made meanwhile is the user's: kept as it is, and the later trials run it.
        Returns whether the trial had changed anything (a paused trial that had must not run on:
        what it wrote is gone). A file the trial's processes did not note writing (`trial_writes`)
        is another program's, written meanwhile: kept as it is, like the user's edits."""
        self.settled = False
        touched = False
        now = snapshot(self.root, self.out)
        wrote = trial_writes(trial_dir / WROTE)
        self.before.held |= now.held  # (a writer that ended since: its file is still not the trial's)
        changed = sorted(p for p, stat in now.files.items()
                         if self.before.files.get(p) != stat and p not in self.before.held)
        for rel in changed + sorted(set(self.before.files) - set(now.files) - now.held):
            if rel in now.files and rel.endswith(SOURCE) or wrote is not None and not wrote(str(self.root / rel)):
                self.edited.add(rel)  # the user's, or another program's: as it is now
                if rel not in now.files:
                    self.before.files.pop(rel, None)
                    continue
                self.before.files[rel] = now.files[rel]
                if self.restorable:
                    _copy(self.root / rel, self.backup / rel)
                continue
            self.written.add(rel)
            touched = True
            if rel not in self.before.files:  # the trial's own output: kept with the trial
                _move(self.root / rel, trial_dir / WRITTEN / rel)
            elif self.restorable:
                if rel in now.files:  # the trial's version, kept with the trial
                    _move(self.root / rel, trial_dir / WRITTEN / rel)
                _copy(self.backup / rel, self.root / rel)
            else:
                self.overwritten.add(rel)
        for rel in sorted(now.dirs - self.before.dirs, key=len, reverse=True):  # folders it made, deepest first
            if wrote is not None and not wrote(str(self.root / rel)):
                self.before.dirs.add(rel)  # another program's
                continue
            touched = True
            try:
                (self.root / rel).rmdir()
            except OSError:
                pass  # not empty: files below the depth tracked
        self.settled = True
        return touched

    def close(self) -> None:
        """Drop the copy, unless a put-back was interrupted (a second Ctrl-C): then the next fix
        finishes it from the copy."""
        if self.settled:
            shutil.rmtree(self.backup, ignore_errors=True)


def _last_write(out: Path) -> int:
    """mtime_ns of the newest file a fix wrote under `out` (its trials' stores, its fix.json)."""
    newest = 0
    for path in out.rglob("*"):
        if path.is_file() and not {BACKUP, INTERRUPTED} & set(path.relative_to(out).parts):
            newest = max(newest, path.stat().st_mtime_ns)
    return newest


def _same(copy: Path, current: Path) -> bool:
    """The file is as copied (copies keep their mtime), or a link to the same place."""
    try:
        if copy.is_symlink() or current.is_symlink():
            return copy.is_symlink() and current.is_symlink() and os.readlink(copy) == os.readlink(current)
        a, b = copy.stat(), current.stat()
    except OSError:
        return False
    return (a.st_mtime_ns, a.st_size) == (b.st_mtime_ns, b.st_size)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink():
        dst.unlink()
    # with its mtime, so a restored file compares equal to the snapshot; a symlink as a link
    shutil.copy2(src, dst, follow_symlinks=False)


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dst)
