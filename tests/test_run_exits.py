"""The ways a script watched by `gradwatch run` ends, each with its steps stored."""

import os
import subprocess
import sys

from gradwatch.store import read_run

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TRAIN = ("import os, signal, torch\n"
         "torch.manual_seed(0)\n"
         "model = torch.nn.Linear(4, 1)\n"
         "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
         "for _ in range(7):\n"
         "    loss = model(torch.randn(8, 4)).pow(2).mean()\n"
         "    opt.zero_grad(); loss.backward(); opt.step()\n"
         "    print(repr(loss.item()), flush=True)\n")
def signalled_in_flush(name):
    """The training script, its store writes receiving signal `name` (as a Pool worker's exit flush may)."""
    return TRAIN.replace("for _", (
        "from gradwatch.collect.auto import start_from_env\n"
        "watch = start_from_env.watch\n"
        "write = watch._write\n"
        "def write_signalled(ready):\n"
        f"    os.kill(os.getpid(), signal.{name})  # handled at the next line: inside the flush\n"
        "    write(ready)\n"
        "watch._write = write_signalled\n"
        "for _"))


TERMINATE = "os.kill(os.getpid(), signal.SIGTERM)\nprint('not reached')\n"


def run(tmp_path, code, *options):
    """`gradwatch run` of `code`, a script that prints each step's loss."""
    script = tmp_path / "train.py"
    script.write_text(code)
    return subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), *options, str(script)],
                          capture_output=True, text=True, env=ENV, timeout=120)


def assert_stored(tmp_path, result):
    run = read_run(tmp_path / "r")
    assert list(run.steps) == list(range(7))
    assert list(run.loss) == [float(line) for line in result.stdout.split()]


def test_a_sigterm_during_the_exit_flush_waits_for_it(tmp_path):
    """A multiprocessing Pool sends SIGTERM to each worker as the worker exits: it arrived during
    the worker's exit flush, which the handler cut short, leaving an empty store (a 3-task sweep
    on 2 spawn workers kept 25 of its 75 steps). The signal now waits for the flush, then ends
    the process as it would have."""
    result = run(tmp_path, signalled_in_flush("SIGTERM"))
    assert result.returncode == 128 + 15, result.stderr  # it still dies of the signal
    assert_stored(tmp_path, result)


def test_a_script_ending_with_os_exit_keeps_its_steps(tmp_path):
    """`os._exit` runs no atexit: a 30-step script ending with it stored nothing at all."""
    result = run(tmp_path, TRAIN + "os._exit(4)\n")
    assert result.returncode == 4, result.stderr
    assert_stored(tmp_path, result)
    # how it ended is in the store and said; its last steps, left in the -wal file, are in the file
    assert read_run(tmp_path / "r").meta["exit"] == {"code": 4}
    assert not (tmp_path / "r" / "gradwatch.sqlite-wal").exists()
    assert "gradwatch: partial run: the command ended with exit code 4 at step 6; every step" in result.stderr


def test_a_script_killed_with_sigkill_is_said_to_have_lost_its_last_steps(tmp_path):
    """Killed by SIGKILL (the out-of-memory killer), a script cannot store its last steps: the
    summary said only what was stored, as if the run had been shorter."""
    result = run(tmp_path, TRAIN + "os.kill(os.getpid(), signal.SIGKILL)\n", "--flush-every", "5")
    assert result.returncode == 128 + 9
    assert "killed (SIGKILL; out of memory?): the steps after its last store write (every 5 steps, --flush-every) are lost" in result.stderr
    assert list(read_run(tmp_path / "r").steps) == list(range(5))
    assert read_run(tmp_path / "r").meta["exit"] == {"code": 137}
    assert "still being written" not in result.stderr  # the lock `gradwatch run` saw held was its own


def test_a_sigterm_sent_twice_stores_every_step(tmp_path):
    """Sent to the process group (Slurm's time limit, `kill -TERM -PGID`), SIGTERM reaches the
    script twice: directly, and passed on by `gradwatch run`. The second killed the script in
    the flush the first began: the steps since the last flush were lost (50 of 76)."""
    result = run(tmp_path, signalled_in_flush("SIGTERM") + TERMINATE)
    assert result.returncode == 128 + 15, result.stderr
    assert_stored(tmp_path, result)


def test_a_sigchld_handler_does_not_break_the_last_flush(tmp_path):
    """A DataLoader's SIGCHLD handler raises when its workers die of a signal: under a SIGTERM to
    the whole process group it raised inside the script's last flush (50 of 76 steps stored)."""
    raising = ("def on_child(signum, frame):\n"
               "    raise RuntimeError('DataLoader worker is killed by signal: Terminated')\n"
               "signal.signal(signal.SIGCHLD, on_child)\n")
    result = run(tmp_path, signalled_in_flush("SIGCHLD").replace("for _", raising + "for _", 1) + TERMINATE)
    assert result.returncode == 128 + 15, result.stderr
    assert_stored(tmp_path, result)


def test_a_hangup_is_passed_on_and_the_end_of_the_run_recorded(tmp_path):
    """A closed terminal or a dropped ssh session (SIGHUP) killed `gradwatch run` with its command:
    no end recorded, no findings, the store's last steps left in its -wal file. It now passes the
    signal on, as SIGTERM, and records how the command ended. (A command that does not train:
    no torch import, so this runs in a fraction of a second.)"""
    import signal

    from gradwatch import runner
    from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter

    layer = LayerInfo("fc", "Linear", 0, "param", 5)
    writer = RunStoreWriter(tmp_path / "gradwatch.sqlite")
    writer.write(FlushBatch([layer], steps=[(0, 1.0, 0.1, "", 0.0)], layer_rows=[(0, "fc", 1.0, *[None] * 9)]))
    writer.close()
    received = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: received.append(signum))
    try:  # the command hangs up its parent (this process), then waits to be ended by it
        hangup = "import os, signal, time; os.kill(os.getppid(), signal.SIGHUP); time.sleep(5)"
        result = runner.run([sys.executable, "-c", hangup], tmp_path, {})
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert received == []  # handled by `gradwatch run` while the command ran: passed on to it
    assert result.exit_code == 128 + signal.SIGHUP
    run = read_run(tmp_path)
    assert run.meta["exit"] == {"code": 129} and list(run.steps) == [0]


def test_a_script_hung_up_stores_its_last_steps(tmp_path):
    """A closed terminal sends SIGHUP to the whole process group, the training script too, which
    died of it without storing the steps since its last flush (here: all 7, flushed every 50)."""
    result = run(tmp_path, TRAIN + "os.kill(os.getpid(), signal.SIGHUP)\nprint('not reached')\n")
    assert result.returncode == 128 + 1, result.stderr
    assert_stored(tmp_path, result)


def test_a_script_that_re_executes_itself_keeps_the_steps_before_the_exec(tmp_path):
    """`os.execv` (a script restarting itself, as `os.execl` and `os.execvp` do through it) runs no
    atexit: the 7 steps before it, never flushed (every 50), were lost, and only the restarted
    stage's were stored. Each stage's steps are now stored, the first one's in the main store; the
    second stage, the same pid, was summarised as "another process"."""
    code = ("import sys\n" + TRAIN
            + "if 'again' not in sys.argv:\n"
            + "    os.execv(sys.executable, [sys.executable, *sys.argv, 'again'])\n")
    result = run(tmp_path, code)
    assert result.returncode == 0, result.stderr
    losses = [float(line) for line in result.stdout.split()]
    stores = sorted((tmp_path / "r").glob("gradwatch*.sqlite"), key=lambda p: p.name != "gradwatch.sqlite")
    assert len(losses) == 14 and len(stores) == 2
    assert list(read_run(stores[0]).loss) == losses[:7] and list(read_run(stores[1]).loss) == losses[7:]
    assert "gradwatch: the same process after os.execv (" in result.stderr and "another process" not in result.stderr


def test_a_failed_exec_that_the_script_catches_leaves_the_watch_on(monkeypatch, tmp_path):
    """An os.execv that fails (OSError, caught by the script, which trains on; os.execvp meets one
    per PATH entry it tries) detached the watch first: every later step was lost, unsaid (20 of 50
    stored). The steps before it are stored, and the watch goes on."""
    import torch

    from gradwatch.collect import auto

    for name in ("_exit", "execv", "execve"):  # (the wrappers below go at the test's end)
        monkeypatch.setattr(os, name, getattr(os, name))
    watch = auto.AutoWatch(str(tmp_path))
    monkeypatch.setattr(auto.start_from_env, "watch", watch, raising=False)
    auto._flush_on_os_exit()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(10):
        if step == 4:
            try:
                os.execv(str(tmp_path / "missing"), ["missing"])
            except OSError:
                assert len(read_run(tmp_path).steps) == 4  # (stored before the exec)
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    watch.detach()
    assert list(read_run(tmp_path).loss) == losses
