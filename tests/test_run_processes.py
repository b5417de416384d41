"""Processes a script watched by `gradwatch run` starts: forked ones do not write the run's store;
spawned ones and those it runs with subprocess write stores of their own, never the training's,
and end as they would without gradwatch."""

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from gradwatch.store import read_run

ENV = dict(os.environ, OMP_NUM_THREADS="1")

SCRIPT = """
import multiprocessing, torch
from torch.utils.data import DataLoader, TensorDataset

def train(seed, steps, loader=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, _ in loader or [(torch.randn(8, 4), None)] * steps:
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    return losses

if __name__ == "__main__":
    data = DataLoader(TensorDataset(torch.randn(56, 4), torch.zeros(56)), batch_size=8, num_workers=2)
    for loss in train(0, 7, data):
        print(repr(loss))
    with multiprocessing.get_context("fork").Pool(2) as pool:  # a sweep in forked workers
        pool.starmap(train, [(1, 12), (2, 12)])
"""


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_forked_workers_do_not_write_the_parents_store(tmp_path):
    """A fork Pool's workers inherited the watch: training, they wrote their steps and the
    parent's unflushed ones into the parent's store (120 steps where the script took 70, then
    'UNIQUE constraint failed' from the second worker). DataLoader workers are forked too."""
    (tmp_path / "sweep.py").write_text(SCRIPT)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), "--flush-every", "5",
                             str(tmp_path / "sweep.py")], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cannot write" not in result.stderr
    run = read_run(tmp_path / "r")
    assert list(run.steps) == list(range(7))
    assert list(run.loss) == [float(line) for line in result.stdout.split()]
    assert sorted(p.name for p in (tmp_path / "r").glob("*.sqlite")) == ["gradwatch.sqlite"]
    # ... and what they trained is said to be unrecorded (the summary said nothing of it)
    assert "a process forked from a watched one trained, unrecorded (a multiprocessing Process or Pool worker, started by fork)" in result.stderr


def test_forked_workers_that_do_not_train_are_not_said_to(tmp_path):
    """DataLoader workers are forked too, and step no optimizer (in this process: the mark that
    a forked worker's first optimizer step makes, and the summary's note of it)."""
    import io

    from gradwatch.cli.summary import print_run_summary
    from gradwatch.collect.auto import _mark_if_training
    from gradwatch.runner import FORKED_MARK

    out = io.StringIO()
    print_run_summary(tmp_path, out)
    assert "trained, unrecorded" not in out.getvalue()
    import torch

    from gradwatch.collect import auto

    _mark_if_training(str(tmp_path))
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    model(torch.ones(1, 2)).sum().backward()
    assert not (tmp_path / FORKED_MARK).exists()  # a forward and backward: no mark
    opt.step()
    opt.step()  # (the hook stays, marking once)
    assert (tmp_path / FORKED_MARK).exists()
    auto._forked_hooks.pop().remove()
    g = model.weight.grad
    assert torch.equal(model.weight.detach(), before.add(g, alpha=-0.1).add(g, alpha=-0.1))  # stepped as without it
    print_run_summary(tmp_path, out)
    assert "a process forked from a watched one trained, unrecorded" in out.getvalue()


SIGNALS = """
import multiprocessing, signal, torch

def caught():  # is SIGTERM caught (a handler installed), from the kernel's view
    mask = int(open("/proc/self/status").read().split("SigCgt:")[1].split()[0], 16)
    return bool(mask >> (signal.SIGTERM - 1) & 1)

def child():
    print("child", caught(), flush=True)

if __name__ == "__main__":
    print("parent", caught(), flush=True)
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start(); process.join()
"""


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the signal mask from /proc")
def test_a_forked_child_dies_of_sigterm_by_default(tmp_path):
    """The watched process flushes on SIGTERM through a Python handler; a forked child inherited it,
    and a fork Pool worker blocked in C when `Pool.__exit__` sent it a SIGTERM never ran it: the
    pool's join hung. The child has the default disposition back, as without gradwatch. (Read
    from the kernel: `signal.getsignal` says SIG_DFL for gradwatch's handler.)"""
    (tmp_path / "signals.py").write_text(SIGNALS)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"),
                             str(tmp_path / "signals.py")], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["parent", "True", "child", "False"]


LOST_SIGNAL = """
import multiprocessing, signal, threading, time, torch

def train_then_wait(queue):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(7):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        print(repr(loss.item()), flush=True)
    # a SIGTERM taken by the C handler in another thread, as one landing just before a blocking
    # wait is: the main thread, blocked in the queue's read, never runs a Python handler
    threading.Thread(target=lambda: (time.sleep(0.3), signal.pthread_kill(threading.get_ident(), signal.SIGTERM))).start()
    queue.get()  # as an idle Pool worker waits for its next task

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    worker = ctx.Process(target=train_then_wait, args=(queue,))
    worker.start()
    worker.join(15)
    print("exitcode", worker.exitcode, flush=True)
    if worker.exitcode is None:
        worker.kill()
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="no pthread_kill here")
def test_a_spawned_worker_waiting_for_work_dies_of_a_sigterm(tmp_path):
    """A spawn Pool's `__exit__` ends its idle workers with SIGTERM, blocked in SimpleQueue.get.
    gradwatch's Python handler runs only when the main thread next runs Python: a SIGTERM landing
    just before the wait was never handled, the worker never died and the pool's join hung (1 run
    in 40 of a spawn Pool sweep under load). It now dies of it, as without gradwatch, its steps
    stored before the wait."""
    (tmp_path / "lost.py").write_text(LOST_SIGNAL)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(tmp_path / "lost.py")],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    *losses, said = result.stdout.splitlines()
    assert said == f"exitcode {-15}"
    [store] = (tmp_path / "r").glob("gradwatch-pid*.sqlite")
    run = read_run(store)
    assert list(run.steps) == list(range(7))
    assert list(run.loss) == [float(x) for x in losses]


EVALUATES = """
import subprocess, sys, torch

def train(steps, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        print(repr(loss.item()), flush=True)

if __name__ == "__main__":
    if sys.argv[1:] == ["child"]:
        train(5, 1)  # an evaluation that fine-tunes
    else:
        train(6, 0)
        subprocess.run([sys.executable, __file__, "child"], check=True, stdout=subprocess.DEVNULL)
        train(6, 0)
"""


def test_a_script_started_by_the_training_does_not_take_its_store(tmp_path):
    """A training that runs a script of its own with subprocess (an evaluation that fine-tunes)
    before its first flush (6 steps, flushed every 50): the child, watched too, flushed first and
    took the run's main store; `gradwatch diagnose RUN` read its 5 steps, and the training was
    summarised as "another process". The store is now taken at the first optimizer step."""
    (tmp_path / "train.py").write_text(EVALUATES)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(tmp_path / "train.py")],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    run = read_run(tmp_path / "r")
    assert list(run.loss) == [float(x) for x in result.stdout.split()]  # the training's 12 steps
    [child] = (tmp_path / "r").glob("gradwatch-pid*.sqlite")
    assert len(read_run(child).steps) == 5
    assert "gradwatch: another process (" in result.stderr and "): 5 steps, 1 layer," in result.stderr


def test_a_store_left_empty_is_removed_at_the_end(tmp_path):
    """A process killed before its first write leaves its store file empty (taken at its first
    step): it would hide the other processes' stores from `gradwatch diagnose RUN`."""
    from gradwatch.runner import finish_run
    from gradwatch.store import FlushBatch, LayerInfo, RunStoreWriter

    (tmp_path / "gradwatch.sqlite").touch()
    writer = RunStoreWriter(tmp_path / "gradwatch-pid7.sqlite")
    writer.write(FlushBatch([LayerInfo("fc", "Linear", 0, "param", 5)], steps=[(0, 1.0, 0.1, "", 0.0)],
                            layer_rows=[(0, "fc", 1.0, *[None] * 9)]))
    writer.close()
    finish_run(tmp_path, 137)
    assert not (tmp_path / "gradwatch.sqlite").exists()
    run = read_run(tmp_path)
    assert list(run.steps) == [0] and run.meta["exit"] == {"code": 137}


BY_HAND_THEN_A_FINE_TUNE = """
import subprocess, sys, torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
for step in range(12):
    model.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    if step == 2:  # a short fine-tune, with an optimizer, in a process of its own
        subprocess.run([sys.executable, "-c", '''
import torch
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(5):
    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
'''], check=True)
"""


def test_the_command_trained_by_hand_keeps_the_main_store(tmp_path):
    """A training by hand (no optimizer) claimed no store before its first flush: a subprocess
    stepping an optimizer took the main one, and the script's training was "another process"."""
    (tmp_path / "train.py").write_text(BY_HAND_THEN_A_FINE_TUNE)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), str(tmp_path / "train.py")],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(read_run(tmp_path / "r").steps) == 12
    others = list((tmp_path / "r").glob("gradwatch-pid*.sqlite"))
    assert len(others) == 1 and len(read_run(others[0]).steps) == 5
