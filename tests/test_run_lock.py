"""Two `gradwatch run`s into one --out: the second is refused while the first lives, and a run
killed with -9 leaves no lock behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gradwatch.store import read_run

SCRIPTS = Path(__file__).parent / "scripts"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def start(out, pidfile):
    """`gradwatch run` of a script that trains until killed, in a session of its own."""
    return subprocess.Popen([sys.executable, "-m", "gradwatch", "run", "--out", str(out), "--flush-every", "5",
                             str(SCRIPTS / "killme.py"), "--pid", str(pidfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def wait_steps(proc, steps):
    for line in proc.stdout:
        if line.strip().isdigit() and int(line) >= steps:
            return
    raise AssertionError(f"the script ended early: {proc.stderr.read()}")


def run(out, *args):
    return subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(out), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=120)


def test_a_live_runs_directory_is_refused_until_the_run_is_dead_even_killed_with_sigkill(tmp_path):
    """The second run cleared the first's store as it started: the first's steps were lost. Now it
    is refused while the first lives: also while the watched script outlives its `gradwatch run`
    killed with -9 (the script is still writing). Once the script is dead too, the directory is
    free: a killed run leaves no lock behind."""
    first = start(tmp_path / "r", tmp_path / "pid1")
    try:
        wait_steps(first, 20)
        second = run(tmp_path / "r", SCRIPTS / "killme.py", "--pid", tmp_path / "pid2")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is writing to {str(tmp_path / 'r')!r}; choose another --out, or wait for it to end" in second.stderr
        assert not (tmp_path / "pid2").exists()  # refused before the script started
        wait_steps(first, 30)
        steps = read_run(tmp_path / "r").steps
        assert steps[0] == 0 and len(steps) >= 30 and list(steps) == list(range(len(steps)))
        child = int((tmp_path / "pid1").read_text())
        first.kill()
        first.wait(timeout=60)
        assert "is writing to" in run(tmp_path / "r", SCRIPTS / "train_optim.py", 5).stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the script, in the same session
    deadline = time.monotonic() + 30
    while not _dead(child):  # (a zombie no one reaps holds no lock)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = run(tmp_path / "r", SCRIPTS / "train_optim.py", 5)
    assert result.returncode == 0, result.stderr
    assert len(read_run(tmp_path / "r").steps) == 5


def _dead(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_what_the_command_leaves_running_does_not_keep_the_run_live(tmp_path):
    """A script that starts a helper in the background (`os.system("tensorboard ... &")`) passed it
    the run directory's lock: after the command had ended, the run read as "still being written"
    and the next `gradwatch run --out` there was refused. (In this process: no torch is imported.)"""
    import fcntl

    from gradwatch import runner

    helper = tmp_path / "helper.pid"
    script = f"import os; os.system('sleep 30 > /dev/null 2>&1 & echo $! > {helper}')"
    run_dir, lock = runner.claim_run_dir(tmp_path / "r")
    try:
        assert runner.run([sys.executable, "-c", script], run_dir, {}, lock).exit_code == 0
    finally:
        os.close(lock)
    try:
        fd = os.open(run_dir / ".gradwatch.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the helper holds it
        finally:
            os.close(fd)
    finally:
        os.kill(int(helper.read_text()), signal.SIGKILL)


def test_a_lock_held_after_its_run_ended_is_said_so(tmp_path):
    """A process left running by a shell script of the command (which gradwatch cannot reach)
    holds the lock: the refusal named the run's pid, long dead, as "writing"."""
    import fcntl

    from gradwatch import runner
    from gradwatch.errors import ConfigError

    (tmp_path / "r").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (tmp_path / "r" / ".gradwatch.lock").write_text(str(dead.pid))
    fd = os.open(tmp_path / "r" / ".gradwatch.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # (this process stands for the process left running)
    try:
        runner.claim_run_dir(tmp_path / "r")
        raise AssertionError("claimed")
    except ConfigError as exc:
        assert f"the gradwatch run of pid {dead.pid} has ended, but a process its command left running" in str(exc)
    finally:
        os.close(fd)


def test_a_run_that_replaces_an_earlier_one_says_so(tmp_path, capsys):
    """`gradwatch run --out same` after a finished 200-step run there replaced it without a word."""
    from gradwatch import runner

    for earlier in (False, True):
        if earlier:
            (tmp_path / "r" / "gradwatch.sqlite").write_text("")
        run_dir, lock = runner.claim_run_dir(tmp_path / "r")
        os.close(lock)
        said = capsys.readouterr().err
        assert ("held an earlier run; this one replaces it" in said) == earlier
        assert not (run_dir / "gradwatch.sqlite").exists()
