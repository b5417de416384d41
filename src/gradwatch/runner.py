"""`gradwatch run`: run a script, module or command as usual, with every torch process watched.

The target runs in a child process started exactly as `python script.py args` would start it
(same argv, `__main__`, sys.path, stdout, stderr and exit code); a start-up hook on PYTHONPATH
begins watching when the child imports torch. Processes the command starts in turn (torchrun
workers, a shell script's pythons, spawned multiprocessing workers) are watched into the same run,
each into a store file of its own (collect/auto.py); forked ones are not (collect/auto.py says why).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gradwatch.diagnose.finding import FINDINGS_FILE
from gradwatch.errors import ConfigError
from gradwatch.say import say
from gradwatch.store.reader import LOCK_FILE
from gradwatch.store.writer import finish_store

try:
    import fcntl
except ImportError:  # Windows: runs into one directory are not guarded
    fcntl = None

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "_bootstrap"
ENV_RUN_DIR = "GRADWATCH_RUN_DIR"  # what the child's start-up hook reads (collect/auto.py)
# set in `gradwatch fix`'s trials only (fix/trial.py; see in_fix_trial)
ENV_REMEDY = "GRADWATCH_REMEDY"
ENV_MAX_STEPS = "GRADWATCH_MAX_STEPS"
WATCHED_MARK = ".gradwatch-watched"  # made in the run directory by each process the hook watches
FORKED_MARK = ".gradwatch-forked-trained"  # made by a forked process that steps an optimizer, unrecorded
ENV_LOCK_FD = "GRADWATCH_LOCK_FD"  # the run directory's lock, passed to the command (see `run`)
ENV_RUNNER_PID = "GRADWATCH_RUNNER_PID"  # this process's pid: its child is the command (is_the_command)
ENV_OPTIONS = {"every": "GRADWATCH_EVERY", "sample_every": "GRADWATCH_SAMPLE_EVERY", "flush_every": "GRADWATCH_FLUSH_EVERY",
               "all_ranks": "GRADWATCH_ALL_RANKS", "status": "GRADWATCH_STATUS"}


@dataclass
class RunResult:
    run_dir: Path
    exit_code: int


def default_run_dir(root: str | os.PathLike = "runs") -> Path:
    """A new runs/<timestamp>, made here: two runs started in the same second get one each."""
    root = output_dir(root)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def clear_run(path: Path) -> None:
    """Remove a previous run's store and findings from `path`: a new run replaces it."""
    for old in [*path.glob("gradwatch*.sqlite*"), path / FINDINGS_FILE, path / WATCHED_MARK, path / FORKED_MARK]:
        old.unlink(missing_ok=True)


def output_dir(path: str | os.PathLike, option: str = "--out", what: str = "the directory") -> Path:
    """Create a directory for output and prove it is writable, or say in one line why it is not (a
    file is in the way, no permission, a read-only file system) before any work is done: a
    failure found only when the results are saved would waste the whole run."""
    if not str(path).strip():  # Path("") is the current directory: an unset variable, not a choice
        raise ConfigError(f"{option} is empty; give a directory, e.g. {option} runs/demo")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gradwatch-write-test-{os.getpid()}"  # one per process: ranks share a directory
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        why = exc.strerror
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            blocking = next((p for p in (path, *path.parents) if p.is_file()), path)
            why = ("a file of that name is in the way" if blocking == path
                   else f"{str(blocking)!r} on its way is a file, not a directory")
        raise ConfigError(f"cannot write to {what} {str(path)!r} ({why}); choose another {option}") from exc
    return path


def prepare_run_dir(path: str | os.PathLike) -> Path:
    """Create the run directory and prove it is writable before the target starts. A run
    written there before is replaced (its store files and findings), as `coverage run` does."""
    path = output_dir(path, what="the run directory")
    try:
        clear_run(path)
    except OSError as exc:
        raise ConfigError(f"cannot write to the run directory {str(path)!r} ({exc.strerror}); choose another --out") from exc
    return path


def claim_run_dir(path: str | os.PathLike) -> tuple[Path, int]:
    """Prepare the run directory for a run that owns it: a lock on it, held until the run and
    every process it passed the lock to have ended, then its earlier run cleared. A second run
    into a live one's directory would clear the store being written. The kernel drops the lock
    with its last holder, so a run killed with -9 leaves none behind. Returns the directory and
    the lock's file descriptor (for `run`)."""
    path = output_dir(path, what="the run directory")
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pids = os.read(fd, 64).decode(errors="replace").split()  # gradwatch run's, then its command's
        owner = pids[0] if pids else "?"
        os.close(fd)
        if pids and all(p.isdigit() and not _alive(int(p)) for p in pids):
            # (a process that a shell script of the command started in the background)
            raise ConfigError(f"the gradwatch run of pid {owner} has ended, but a process its command left running "
                              f"still holds {str(path / LOCK_FILE)!r} (`fuser -v` on it names the process); end "
                              f"that process, or choose another --out") from None
        raise ConfigError(f"another gradwatch run (started by pid {owner}) is writing to {str(path)!r}; "
                          f"choose another --out, or wait for it to end") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    if any(path.glob("gradwatch*.sqlite")):  # (replaced silently, a finished run was lost unannounced)
        say(f"gradwatch: {str(path)!r} held an earlier run; this one replaces it (give another --out to keep both)")
    try:
        return prepare_run_dir(path), fd
    except ConfigError:
        os.close(fd)
        raise


def _shebang(path: Path) -> str | None:
    """The interpreter a script's `#!` line names (`/bin/sh`, `/usr/bin/env bash`), if it has one."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    return first[2:].decode(errors="replace").strip() or None


SHELLS = ("sh", "bash", "zsh", "dash", "ksh", "fish", "csh", "tcsh")


def _shell(interpreter: str) -> bool:
    """A `#!` line naming a shell (`/bin/sh`, `/usr/bin/env bash`): not a Python script. Any other
    interpreter may run Python (`uv run --script`, pypy, a venv's python): the script stays python's."""
    words = interpreter.split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    return bool(words) and os.path.basename(words[0]) in SHELLS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def build_command(script: str | None, module: str | None, argv: list[str]) -> list[str]:
    """The child's command line: `python script.py ...`, `python -m module ...` or a raw command."""
    if module:
        return [sys.executable, "-m", module, *argv]
    if script:
        if not Path(script).is_file():
            if os.sep not in script and shutil.which(script, path=_child_path()):  # `gradwatch run python train.py`: a command
                return build_command(None, None, [script, *argv])
            if Path(script).is_dir():
                main = " (it has a __main__.py: `gradwatch run -m` its package, or the file)" \
                    if (Path(script) / "__main__.py").is_file() else ""
                raise ConfigError(f"{script!r} is a directory, not a Python file{main}; give the path of the script "
                                  "that trains")
            raise ConfigError(f"no such script: {script!r}; give the path of a Python file, or `-- COMMAND` to run a command")
        interpreter = _shebang(Path(script))
        if interpreter and _shell(interpreter):  # python would fail on it with a SyntaxError
            raise ConfigError(f"{script!r} is not a Python script (#!{interpreter}): run it as a command, "
                              f"gradwatch run -- {interpreter} {script}")
        return [sys.executable, script, *argv]
    if not argv:
        raise ConfigError("nothing to run: give a script (train.py [args]), `-m module`, or `-- COMMAND ...`")
    if argv[0].endswith(".py") and Path(argv[0]).is_file():  # `-- train.py`: meant as python train.py
        return [sys.executable, *argv]
    if shutil.which(argv[0], path=_child_path()) is None:  # (the venv's torchrun, not on PATH unactivated)
        if not Path(argv[0]).exists():
            raise ConfigError(f"command not found: {argv[0]!r}")
        if os.sep not in argv[0] or not os.access(argv[0], os.X_OK):
            raise ConfigError(f"cannot run {argv[0]!r}: not an executable command; give `python {argv[0]}` after --, "
                              f"or ./{argv[0]} if it is executable")
    return argv


def command_from_target(target: list[str], module: list[str] | str | None) -> list[str]:
    """The child's command from the CLI's trailing arguments: `script.py args`, `-m module args`
    (`module`: the module's name and its arguments, as the CLI's `-m` takes them) or `-- COMMAND args`."""
    target = list(target)
    if isinstance(module, list):
        if not module:
            raise ConfigError("-m needs a module name, e.g. -m pkg.train --lr 0.1")
        module, target = module[0], [*module[1:], *target]
    script = None
    if target and target[0] == "--":
        target = target[1:]
    elif target and not module:
        script, target = target[0], target[1:]
    return build_command(script, module, target)


def in_fix_trial() -> bool:
    """This process is (or was started by) a trial of `gradwatch fix`: the start-up hook loads the
    remedy injection (fix/inject.py) for it alone."""
    return bool(os.environ.get(ENV_REMEDY) or os.environ.get(ENV_MAX_STEPS))


def is_the_command() -> bool:
    """This process is the command `gradwatch run` started, not one that command started in turn."""
    return os.environ.get(ENV_RUNNER_PID) == str(os.getppid())


def child_env(run_dir: Path, options: dict[str, int], lock: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV_RUN_DIR] = str(run_dir.resolve())
    env.pop(ENV_LOCK_FD, None)  # (one of an enclosing run's is not this run's)
    if lock is not None:  # the start-up hook keeps it from what the script leaves running (_bootstrap)
        env[ENV_LOCK_FD] = str(lock)
    env[ENV_RUNNER_PID] = str(os.getpid())
    for key, value in options.items():
        env[ENV_OPTIONS[key]] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BOOTSTRAP_DIR), env.get("PYTHONPATH")]))
    env["PATH"] = _child_path()
    return env


def _child_path() -> str:
    """The command's PATH: `-- python ...` (or `torchrun`) means the one installed beside gradwatch,
    as an activated venv would."""
    return os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))


def run(command: list[str], run_dir: Path, options: dict[str, int], lock: int | None = None) -> RunResult:
    """Run `command` watched into `run_dir`; returns its exit code (128+N if killed by signal N).
    `lock` (from `claim_run_dir`) is passed on to the command: the directory stays claimed while
    it runs, even if this process is killed first."""
    # Ctrl-C reaches the child directly (same process group): the parent waits for its end. A
    # handler, not SIG_IGN: an ignored signal stays ignored across exec, and Python would then
    # start the script with Ctrl-C switched off. Unless it was off for us too (a job started with
    # `&` from a script, nohup-like launchers): then it stays off for the script, as without us.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else (lambda signum, frame: None))
    previous_term = signal.getsignal(signal.SIGTERM)
    previous_hup = signal.getsignal(signal.SIGHUP) if hasattr(signal, "SIGHUP") else None
    try:
        proc = subprocess.Popen(command, env=child_env(run_dir, options, lock), pass_fds=() if lock is None else (lock,))
        if lock is not None:  # both, so a lock held with both ended is known as held by a leftover
            os.pwrite(lock, f"{os.getpid()} {proc.pid}".encode(), 0)
        # a SIGTERM sent to us alone is passed on: the child stores its last steps and ends; so
        # is a SIGINT, unless a terminal's Ctrl-C sent it to the child as well (a second one
        # could cut short the child's last flush)
        signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
        if not ignored:
            signal.signal(signal.SIGINT, lambda signum, frame: None if _terminal_foreground() else proc.send_signal(signum))
        if previous_hup is not None:
            # a closed terminal or a dropped ssh session: passed on as SIGTERM is, and this process
            # lives on to record how the command ended (killed with it, it left no end and no
            # findings, and the store's last steps in its -wal file)
            signal.signal(signal.SIGHUP, lambda signum, frame: None if _terminal_foreground() else proc.send_signal(signum))
        code = proc.wait()
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot start {command[0]!r}: {exc.strerror}") from exc
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        if previous_hup is not None:
            signal.signal(signal.SIGHUP, previous_hup)
    code = exit_status(code)
    finish_run(run_dir, code)
    return RunResult(run_dir, code)


def exit_status(returncode: int) -> int:
    """A child's return code as a shell says it: 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def finish_run(run_dir: Path, code: int) -> None:
    """Once the command has ended: how it ended, in each store (one file each, the log folded in).
    A store file still empty was taken by a process killed before its first write (the main one
    is taken at the first optimizer step, collect/auto.py): removed, it hides no other's."""
    for store in sorted(run_dir.glob("gradwatch*.sqlite")):
        if _empty(store):
            store.unlink(missing_ok=True)
        else:
            finish_store(store, code)


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0 and not Path(f"{path}-wal").exists()
    except OSError:
        return False


def _terminal_foreground() -> bool:
    """This process group is a terminal's foreground one: its Ctrl-C reaches every process in it."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):  # no terminal (a supervisor, a pipe, a closed stdin)
        return False


def link_latest(run_dir: Path) -> None:
    """runs/latest -> the newest run, so `gradwatch diagnose runs/latest` works. Linked as the run
    starts: `gradwatch show runs/latest` during a training showed the run before it."""
    latest = run_dir.parent / "latest"
    fresh = run_dir.parent / f".latest-{os.getpid()}"
    try:  # made aside and renamed over the old link: a reader never finds runs/latest missing
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(run_dir.name)
        os.replace(fresh, latest)
    except OSError:
        fresh.unlink(missing_ok=True)
