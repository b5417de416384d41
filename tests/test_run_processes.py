"""Processes a script watched by `gradwatch run` forks: they never write the run's store; those a
multiprocessing Process runs (a fork Pool's workers) write stores of their own."""

import multiprocessing
import os
import subprocess
import sys

import pytest

from gradwatch.store import read_run

ENV = dict(os.environ, OMP_NUM_THREADS="1")

SCRIPT = """
import multiprocessing, sys, torch
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

def train_and_say(seed, steps):
    print("process", train(seed, steps)); sys.stdout.flush()  # (a forked Process ends in os._exit)

if __name__ == "__main__":
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(56, 4), torch.zeros(56)), batch_size=8, num_workers=2)
    print("main", train(0, 7, data))
    fork = multiprocessing.get_context("fork")
    with fork.Pool(2) as pool:  # a sweep in forked workers, ended by Pool.__exit__'s SIGTERM
        print("pool", pool.starmap(train, [(1, 12), (2, 12), (3, 9)]))
    process = fork.Process(target=train_and_say, args=(4, 11))
    process.start(); process.join()
"""


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_forked_workers_write_stores_of_their_own(tmp_path):
    """A fork Pool's workers inherited the watch: training, they wrote their steps and the
    parent's unflushed ones into the parent's store (120 steps where the script took 70, then
    'UNIQUE constraint failed' from the second worker); then they were not recorded at all (a
    hyper-parameter sweep's trainings). Each now writes its own store, as a spawned one does,
    flushed at its end (SIGTERM from Pool.__exit__, os._exit after a Process's target). The
    script's 7 steps, not flushed yet when the workers flush theirs, are still the run's main
    store. The DataLoader's workers, forked too, write nothing."""
    import ast

    (tmp_path / "sweep.py").write_text(SCRIPT)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", "r", "--flush-every", "8", "sweep.py"],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cannot write" not in result.stderr and "unrecorded" not in result.stderr
    said = {line.split(" ", 1)[0]: ast.literal_eval(line.split(" ", 1)[1]) for line in result.stdout.splitlines()}
    run = read_run(tmp_path / "r")
    assert list(run.steps) == list(range(7))
    assert list(run.loss) == said["main"]
    workers = [read_run(path) for path in sorted((tmp_path / "r").glob("gradwatch-pid*.sqlite"))]
    # the Process's and the Pool workers' that took a task (one may take all three); no DataLoader worker's
    assert 2 <= len(workers) <= 3
    pieces = []  # each worker's trainings, one after another: a new model is a new phase
    for w in workers:
        assert list(w.steps) == list(range(len(w.steps)))
        bounds = [0, *w.meta.get("phase_starts", []), len(w.steps)]
        pieces += [list(w.loss[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert sorted(pieces) == sorted([*said["pool"], said["process"]])
    assert result.stderr.count("another process (sweep.py): ") == len(workers)
    # a worker that trained two of the sweep's models holds both, and is said to
    assert "steps, 4 layers of 2 models trained one after another" in result.stderr \
        or "steps, 6 layers of 3 models trained one after another" in result.stderr


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
    assert "a process forked from a watched one outside multiprocessing (os.fork()?) trained, unrecorded" in out.getvalue()
