"""The working directory during `gradwatch fix`: put back after every trial, and never at the cost
of the user's own files: their edits, fix's own log, what they changed after a killed fix."""

import os

from gradwatch.fix.touched import GRACE_S, WROTE, Workspace


def test_fix_own_log_in_the_working_directory_is_left_to_grow(tmp_path):
    """`gradwatch fix ... 2> fix.log`: the log grows during the trials; it was 'put back' to its
    empty self after each one (577 NUL bytes left) and blamed on the script."""
    out = tmp_path / "runs" / "fix"
    log = tmp_path / "fix.log"
    saved = os.dup(2)
    try:
        with open(log, "w") as f:
            os.dup2(f.fileno(), 2)
        w = Workspace(tmp_path, out)
        os.write(2, b"screen-1 ... loss 0.5\n")
        w.settle(out / "screen-1")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert log.read_bytes() == b"screen-1 ... loss 0.5\n" and not w.written
    w.close()


def test_a_source_file_edited_during_the_fix_is_kept_and_a_trials_output_is_never_lost(tmp_path):
    out = tmp_path / "runs" / "fix"
    (tmp_path / "train.py").write_text("lr = 3.0\n")
    (tmp_path / "metrics.csv").write_text("mine\n")
    w = Workspace(tmp_path, out)
    (tmp_path / "train.py").write_text("lr = 0.3\n")  # the user saves an edit mid-trial
    (tmp_path / "idea.py").write_text("# next\n")  # ... and starts a new file
    (tmp_path / "metrics.csv").write_text("the trial's\n")  # the script overwrites its log
    w.settle(out / "screen-1")
    assert (tmp_path / "train.py").read_text() == "lr = 0.3\n" and (tmp_path / "idea.py").is_file()
    assert w.edited == {"train.py", "idea.py"}
    assert (tmp_path / "metrics.csv").read_text() == "mine\n"
    assert (out / "screen-1" / "written" / "metrics.csv").read_text() == "the trial's\n"
    w.settle(out / "screen-2")  # nothing changed since: the edit stays
    assert (tmp_path / "train.py").read_text() == "lr = 0.3\n" and w.written == {"metrics.csv"}
    w.close()


def test_after_a_killed_fix_the_users_later_changes_stay_and_the_trials_are_kept(tmp_path):
    """kill -9 mid-trial, then the user edits and retrains by hand before the next fix: their
    versions (written GRACE_S after the killed fix's last write) stay; what the killed trial left
    is put back, its versions kept in replaced/ and created/."""
    out = tmp_path / "runs" / "fix"
    for name, text in (("train.py", "bias = -4\n"), ("ckpt.pt", "mine"), ("log.txt", "mine")):
        (tmp_path / name).write_text(text)
    Workspace(tmp_path, out)  # never closed: killed during a trial, which ...
    (tmp_path / "log.txt").write_text("the trial's")  # ... changed its log
    (tmp_path / "trial_new.pt").write_text("the trial's")  # ... and saved a checkpoint
    later = os.stat(tmp_path / "log.txt").st_mtime + GRACE_S + 5
    (tmp_path / "train.py").write_text("bias = 0\n")  # the user, minutes later
    (tmp_path / "ckpt.pt").write_text("retrained by hand")
    (tmp_path / "newdata.csv").write_text("theirs")
    for name in ("train.py", "ckpt.pt", "newdata.csv"):
        os.utime(tmp_path / name, (later, later))
    again = Workspace(tmp_path, out)
    kept = out / ".originals-interrupted"
    assert (tmp_path / "log.txt").read_text() == "mine" and (kept / "replaced" / "log.txt").read_text() == "the trial's"
    assert not (tmp_path / "trial_new.pt").exists() and (kept / "created" / "trial_new.pt").is_file()
    assert (tmp_path / "train.py").read_text() == "bias = 0\n"
    assert (tmp_path / "ckpt.pt").read_text() == "retrained by hand" and (tmp_path / "newdata.csv").is_file()
    assert "left as they are" in again.notice and "train.py" in again.notice
    again.close()


def test_a_second_fix_in_the_same_directory_waits_for_the_first_and_says_so(tmp_path):
    """Two fixes in one directory each put it back after their trials: a tester's second fix took
    the first's trial files for an earlier killed fix's and reported the other script's run."""
    import subprocess
    import sys
    import time

    from gradwatch.fix.touched import one_fix_at_a_time

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from gradwatch.fix.touched import one_fix_at_a_time\n"
                               f"with one_fix_at_a_time(Path({str(tmp_path)!r}), print):\n"
                               "    print('held', flush=True); time.sleep(1.5)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    said, start = [], time.monotonic()
    with one_fix_at_a_time(tmp_path, said.append):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert len(said) == 1 and f"another fix (pid {holder.pid}) is running in" in said[0] and "waiting" in said[0]
    assert waited > 0.5  # it waited for the holder's end
    with one_fix_at_a_time(tmp_path, said.append):  # free again: taken at once, nothing said
        pass
    assert len(said) == 1


WRITER = ("import sys, time; from pathlib import Path\n"
          "log, stop = open(sys.argv[1], 'a', buffering=1), Path(sys.argv[2])\n"
          "print('writing', flush=True)\n"
          "for i in range(3000):\n"
          "    if stop.exists(): break\n"
          "    log.write(f'line {i}\\n'); time.sleep(0.02)\n")


def _writer(log, stop, foreign):
    """A process appending to `log` until `stop` exists: a child of this one (a trial still
    running), or one this process did not start (`tee`), begun through a child that exits at once."""
    import subprocess
    import sys

    if not foreign:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, log, stop], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        return proc
    launcher = ("import subprocess, sys\n"
                f"p = subprocess.Popen([sys.executable, '-c', {WRITER!r}, {str(log)!r}, {str(stop)!r}],\n"
                "                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)\n"
                "print(p.stdout.readline().strip(), flush=True)")
    done = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "writing", done.stderr
    return None


def _grows(path, timeout=10):
    import time

    size, deadline = path.stat().st_size, time.monotonic() + timeout
    while path.stat().st_size == size:
        assert time.monotonic() < deadline, f"{path.name} stopped growing"
        time.sleep(0.02)


def test_a_log_another_process_writes_is_left_to_grow_and_the_trials_changes_are_still_put_back(tmp_path):
    """`gradwatch fix ... | tee fix.log`: tee's log grew during the trial, so it was moved into the
    trial's directory and its copy from before the fix put back; tee went on writing into the moved
    file, and the user's fix.log held nothing of the fix (so did a test suite's own output file)."""
    out, log, stop = tmp_path / "runs" / "fix", tmp_path / "fix.log", tmp_path / "stop"
    log.write_text("before\n")
    (tmp_path / "metrics.csv").write_text("mine\n")
    _writer(log, stop, foreign=True)
    try:
        _grows(log)
        w = Workspace(tmp_path, out)
        (tmp_path / "metrics.csv").write_text("the trial's\n")
        _grows(log)
        w.settle(out / "screen-1")
        inode = log.stat().st_ino
        _grows(log)  # still the file its writer writes
        assert log.stat().st_ino == inode and log.read_text().startswith("before\nline 0\n")
        assert not (out / "screen-1" / "written" / "fix.log").exists() and w.written == {"metrics.csv"}
        assert (tmp_path / "metrics.csv").read_text() == "mine\n"  # the trial's change: put back
    finally:
        stop.write_text("")


def test_a_file_a_paused_trial_still_holds_open_is_put_back(tmp_path):
    """A process fix started (a trial paused between rungs) is no other writer: its log is the
    trial's, moved into the trial's directory and put back."""
    out, log, stop = tmp_path / "runs" / "fix", tmp_path / "train.log", tmp_path / "stop"
    log.write_text("before\n")
    w = Workspace(tmp_path, out)
    trial = _writer(log, stop, foreign=False)
    try:
        _grows(log)
        w.settle(out / "screen-1")
        assert log.read_text() == "before\n" and (out / "screen-1" / "written" / "train.log").is_file()
        assert w.written == {"train.log"}
    finally:
        stop.write_text("")
        trial.wait(timeout=30)


TRIAL_SCRIPT = """
import os, sys, torch
from torch import nn
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
torch.save(model.state_dict(), "ckpt.pt")        # opened in C++: says its path itself
with open("log.txt", "a") as f:
    f.write("trial\\n")
os.remove("old.txt")
os.makedirs("trial_dir", exist_ok=True)
open(os.path.join("trial_dir", "x"), "w").close()
"""


def test_files_another_program_writes_during_a_trial_are_left_alone(tmp_path, monkeypatch):
    """A tester's notes, written beside a running fix (and another `gradwatch run`'s store), were
    moved into a trial's directory and blamed on the script: a trial's files are now those its
    processes noted writing; the others are kept as they are, the trial's put back."""
    import sys

    from gradwatch.fix.candidates import Candidate
    from gradwatch.fix.trial import run_trial

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "fix"
    (tmp_path / "train.py").write_text(TRIAL_SCRIPT)
    for name in ("ckpt.pt", "log.txt", "old.txt", "notes.txt"):
        (tmp_path / name).write_text("mine\n")
    w = Workspace(tmp_path, out)
    run_trial([sys.executable, "train.py"], out / "screen-1", Candidate("baseline"), 10)  # (the script runs 3)
    (tmp_path / "notes.txt").write_text("written meanwhile\n")  # another program, during the trial
    (tmp_path / "mine.txt").write_text("new\n")
    (tmp_path / "theirs").mkdir()
    w.settle(out / "screen-1")
    assert w.written == {"ckpt.pt", "log.txt", "old.txt", "trial_dir/x"}
    for name in ("ckpt.pt", "log.txt", "old.txt"):
        assert (tmp_path / name).read_text() == "mine\n", name
    assert not (tmp_path / "trial_dir").exists() and (out / "screen-1" / "written" / "trial_dir" / "x").is_file()
    assert (tmp_path / "notes.txt").read_text() == "written meanwhile\n" and (tmp_path / "mine.txt").is_file()
    assert (tmp_path / "theirs").is_dir() and w.edited == {"notes.txt", "mine.txt"}
    (tmp_path / "notes.txt").write_text("mine again\n")  # and a later trial's put-back keeps theirs
    (out / "screen-2").mkdir()
    (out / "screen-2" / WROTE).write_text("")  # (a trial that wrote nothing)
    w.settle(out / "screen-2")
    assert (tmp_path / "notes.txt").read_text() == "mine again\n"
    w.close()


def test_a_trial_that_runs_another_program_has_every_change_taken_for_its_own(tmp_path, monkeypatch):
    """A trial's `cp ckpt.pt last.pt` (no Python, no hook to note it) left last.pt in place, and every
    later trial resumed from it: once a trial starts a program other than Python, what changed is
    all put back, as before the hook."""
    import sys

    from gradwatch.fix.candidates import Candidate
    from gradwatch.fix.trial import run_trial

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "fix"
    (tmp_path / "train.py").write_text(TRIAL_SCRIPT.replace('os.remove("old.txt")', 'import subprocess; '
                                                            'subprocess.run(["cp", "ckpt.pt", "last.pt"], check=True)'))
    for name in ("ckpt.pt", "log.txt", "old.txt"):
        (tmp_path / name).write_text("mine\n")
    w = Workspace(tmp_path, out)
    run_trial([sys.executable, "train.py"], out / "screen-1", Candidate("baseline"), 10)
    assert "*" in (out / "screen-1" / WROTE).read_text().splitlines()
    w.settle(out / "screen-1")
    assert not (tmp_path / "last.pt").exists() and (out / "screen-1" / "written" / "last.pt").is_file()
    assert "last.pt" in w.written and not w.edited
    w.close()
