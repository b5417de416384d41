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
