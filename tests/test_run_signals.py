"""SIGTERM reaching a script watched by `gradwatch run`: its steps stored, its own handling kept."""

import os
import subprocess
import sys

from gradwatch.store import read_run

ENV = dict(os.environ, OMP_NUM_THREADS="1")

IN_A_THREAD = """
import os, signal, threading, time

def train(ready):
    import torch  # imported here, outside the main thread: Python installs no signal handler from it
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1000):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        print(repr(loss.item()), flush=True)
        if step == 6:
            ready.set()
        time.sleep(0.02 if step >= 6 else 0)

ready = threading.Event()
threading.Thread(target=train, args=(ready,), daemon=True).start()
ready.wait()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
print("not reached")
"""


def run(tmp_path, code):
    (tmp_path / "train.py").write_text(code)
    return subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(tmp_path / "train.py")],
                          capture_output=True, text=True, env=ENV, timeout=60)


def test_a_training_in_a_thread_stores_its_steps_at_sigterm(tmp_path):
    """torch imported in a thread (a training started from a server's or a GUI's worker thread)
    found no handler installed: a SIGTERM ended the script with none of its 7+ steps stored
    (flushed every 50). The start-up hook installs it from the main thread; the training thread
    stores its steps at its next step's end, and the script dies of the signal as before."""
    result = run(tmp_path, IN_A_THREAD)
    assert result.returncode == 128 + 15, result.stderr
    said = [float(x) for x in result.stdout.split()]
    stored = read_run(tmp_path / "r")
    assert len(said) >= 7 and len(stored.steps) >= len(said) - 1  # (the step the signal interrupted)
    assert list(stored.steps) == list(range(len(stored.steps)))
    n = min(len(said), len(stored.steps))
    assert list(stored.loss[:n]) == said[:n]


CHAINING = """
import signal, sys, torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(7):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    print(repr(loss.item()), flush=True)
previous = signal.getsignal(signal.SIGTERM)

def on_term(signum, frame):
    if callable(previous):  # chaining, as Lightning's signal connector does
        previous(signum, frame)
    print("cleaned up", flush=True)
    sys.exit(3)

signal.signal(signal.SIGTERM, on_term)
signal.raise_signal(signal.SIGTERM)
print("not reached")
"""


def test_a_script_handler_that_chains_keeps_its_own_ending(tmp_path):
    """A script installing its own SIGTERM handler after torch's import, which calls the handler
    it found (Lightning's does), called gradwatch's: the script died of the signal there (143),
    its own clean-up and exit code never reached. Without gradwatch it finds the default, calls
    nothing, and ends with its code. Chained to, gradwatch's does nothing: the exit stores the steps."""
    script = tmp_path / "alone.py"
    script.write_text(CHAINING)
    alone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=60)
    result = run(tmp_path, CHAINING)
    assert (result.returncode, result.stdout) == (alone.returncode, alone.stdout) == (3, alone.stdout)
    assert alone.stdout.endswith("cleaned up\n")
    stored = read_run(tmp_path / "r")
    assert list(stored.loss) == [float(x) for x in result.stdout.split()[:7]]


PASSES_IT_ON = """
import os, signal, sys, time, torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(7):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    print(repr(loss.item()), file=sys.stderr, flush=True)
previous = signal.getsignal(signal.SIGTERM)

def on_term(signum, frame):
    print("cleaned up", flush=True)
    if callable(previous):
        previous(signum, frame)
    else:  # the default action: die of the signal
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

signal.signal(signal.SIGTERM, on_term)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still running")
"""


def test_a_script_handler_that_passes_the_signal_on_dies_of_it(tmp_path):
    """A handler calling the one it found, else the default action: it found gradwatch's, which,
    called by it, did nothing, and the script ran on ("still running", exit 0, where it died of
    SIGTERM alone). It finds SIG_DFL, as without gradwatch, and dies of the signal; the default it
    sets is gradwatch's handler standing in, which stores the steps first."""
    script = tmp_path / "alone.py"
    script.write_text(PASSES_IT_ON)
    alone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=60)
    result = run(tmp_path, PASSES_IT_ON)
    assert alone.returncode == -15 and result.returncode == 128 + 15, result.stderr
    assert result.stdout == alone.stdout == "cleaned up\n"
    said = [float(line) for line in alone.stderr.split()]
    assert list(read_run(tmp_path / "r").loss) == said and len(said) == 7


SET_ASIDE = """
import os, signal, torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(7):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    print(repr(loss.item()), flush=True)
old = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a checkpoint's save, not to be cut short
signal.signal(signal.SIGTERM, old)
os.kill(os.getpid(), signal.SIGTERM)
print("not reached")
"""


def test_a_handler_set_aside_and_put_back_still_stores_the_steps(tmp_path):
    """`old = signal.signal(SIGTERM, SIG_IGN)` ... `signal.signal(SIGTERM, old)`: old is SIG_DFL,
    as without gradwatch, and putting it back puts back gradwatch's handler standing in for it."""
    result = run(tmp_path, SET_ASIDE)
    assert result.returncode == 128 + 15, result.stderr
    assert list(read_run(tmp_path / "r").loss) == [float(x) for x in result.stdout.split()]


WHAT_IT_SEES = """
import os, signal, torch

def seen(handler):
    return handler.name if isinstance(handler, signal.Handlers) else type(handler).__name__

print(seen(signal.getsignal(signal.SIGTERM)), signal.getsignal(signal.SIGHUP) in (None, signal.SIG_DFL))
print(seen(signal.signal(signal.SIGTERM, signal.SIG_IGN)))  # Lightning's _has_already_handler: not the user's
print(seen(signal.getsignal(signal.SIGTERM)))
os.kill(os.getpid(), signal.SIGTERM)
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss = model(torch.randn(8, 4)).pow(2).mean()
opt.zero_grad(); loss.backward(); opt.step()
os.kill(os.getpid(), signal.SIGTERM)
print("ignored")
"""


def test_the_script_sees_the_handlers_it_would_see_alone_and_its_sig_ign_is_kept(tmp_path):
    """signal.getsignal and signal.signal's return gave gradwatch's handler (a function) where
    the script alone sees SIG_DFL; SIG_IGN the script sets stays set, also once it has trained."""
    script = tmp_path / "alone.py"
    script.write_text(WHAT_IT_SEES)
    alone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=60)
    result = run(tmp_path, WHAT_IT_SEES)
    assert (result.returncode, result.stdout) == (alone.returncode, alone.stdout) == (0, alone.stdout), result.stderr
    assert alone.stdout == "SIG_DFL True\nSIG_DFL\nSIG_IGN\nignored\n"


JOINED_THREAD = """
import os, signal, threading, time, torch

def train():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        print(repr(loss.item()), flush=True)

worker = threading.Thread(target=train)
worker.start(); worker.join()
print(repr(time.time()), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""


def test_sigterm_after_a_training_thread_ended_stores_its_steps_at_once(tmp_path):
    """The training thread had ended (joined): the SIGTERM waited STEP_WAIT (5 s) for a step that
    never came, then died with none of the 30 steps stored. Nothing is under way there: stored at once."""
    import time

    from gradwatch.collect.exit_signals import STEP_WAIT

    result = run(tmp_path, JOINED_THREAD)
    ended = time.time()
    assert result.returncode == 128 + 15, result.stderr
    *said, sent = result.stdout.split()
    assert ended - float(sent) < STEP_WAIT * 0.8  # (the summary's time included)
    assert list(read_run(tmp_path / "r").loss) == [float(x) for x in said]


STUCK_MID_STEP = """
import os, signal, threading, time, torch
import gradwatch.collect.exit_signals as exit_signals
exit_signals.STEP_WAIT = 0.3  # (5 s in use)

def train(stuck):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward()
        if step == 5:
            stuck.set(); time.sleep(30)  # between its backward and its optimizer step
        opt.step()
        print(repr(loss.item()), flush=True)

stuck = threading.Event()
threading.Thread(target=train, args=(stuck,), daemon=True).start()
stuck.wait()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
"""


def test_a_step_that_outlasts_the_wait_still_stores_the_steps_before_it(tmp_path):
    """The training thread mid-step (a backward awaiting its optimizer step) past STEP_WAIT: the
    script died with the steps since the last flush lost. Stored from the main thread instead."""
    result = run(tmp_path, STUCK_MID_STEP)
    assert result.returncode == 128 + 15, result.stderr
    said = [float(x) for x in result.stdout.split()]
    assert len(said) == 5 and list(read_run(tmp_path / "r").loss[:5]) == said
