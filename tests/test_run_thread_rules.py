"""Zero-code watching's thread rules (one_thread): which thread's calls are the followed training's."""

import copy
import io
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from gradwatch.collect import auto, one_thread
from gradwatch.store import read_run


class Branches(nn.Module):
    """Two branches run by `run` (in a pool's threads inside the forward, as nn.DataParallel's
    parallel_apply does; or one after another)."""

    def __init__(self, pool: ThreadPoolExecutor | None):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return self.head(torch.cat([self.a(x), self.b(x)], 1))
        fa, fb = self.pool.submit(self.a, x), self.pool.submit(self.b, x)
        return self.head(torch.cat([fa.result(), fb.result()], 1))


def trained_branches(run_dir, pool: ThreadPoolExecutor | None, steps: int = 4) -> list[float]:
    run_dir.mkdir()
    torch.manual_seed(0)
    model = Branches(pool)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = auto.AutoWatch(str(run_dir), warn=False, sample_every=1)
    losses = []
    try:
        for _ in range(steps):
            x = torch.randn(16, 4)
            loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        watch.detach()
    return losses


def test_modules_run_in_helper_threads_inside_the_followed_forward_keep_their_activations(tmp_path):
    """A forward's branches run in a pool's threads: their threads were refused as another
    training's, and the branches' activation statistics were lost (a saturation found in them
    became a false stalled_layers). The same as the branches run in the followed thread."""
    with ThreadPoolExecutor(2) as pool:
        threaded = trained_branches(tmp_path / "pool", pool)
    inline = trained_branches(tmp_path / "inline", None)
    assert threaded == inline
    pooled, plain = read_run(tmp_path / "pool"), read_run(tmp_path / "inline")
    for name in ("a.1", "b.1"):
        for metric in ("act_mean", "grad_out_rms"):
            steps, values = pooled.series(name, metric)
            want_steps, want = plain.series(name, metric)
            assert len(want_steps) == 4
            np.testing.assert_array_equal(steps, want_steps)
            np.testing.assert_allclose(values, want, rtol=1e-6)


def test_a_thread_taking_input_gradients_while_the_training_waits_for_its_batch_never_takes_the_watch(
        monkeypatch, tmp_path):
    """The training fetches each batch from a pool (`future.result()`); another thread takes input
    gradients of a frozen copy (saliency maps: backwards, no optimizer) while it waits. Separate
    waits were counted as one (a frame's id is reused) and the watch passed to that thread: 84 to
    133 of 200 steps stored, and a false "train at once". Every step is stored, nothing said."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = copy.deepcopy(model).requires_grad_(False)
    main, todo, losses = threading.get_ident(), queue.Queue(), []

    def saliency() -> None:
        while (go := todo.get()) is not None:
            while one_thread._wait_frame(sys._current_frames().get(main)) is None:
                time.sleep(0.001)  # (until the training waits for its batch)
            for _ in range(3):
                x = torch.randn(8, 4, requires_grad=True)
                probe(x).sum().backward()
            go.set()

    helper = threading.Thread(target=saliency, name="saliency", daemon=True)
    helper.start()
    watch = auto.AutoWatch(str(tmp_path))
    try:
        with ThreadPoolExecutor(1) as pool:
            for step in range(6):
                go = threading.Event()
                if step:
                    todo.put(go)
                else:
                    go.set()
                x = pool.submit(lambda: go.wait(5) and torch.randn(16, 4)).result()
                loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    finally:
        todo.put(None)
        helper.join(10)
        watch.detach()
    np.testing.assert_array_equal(read_run(tmp_path).loss, np.array(losses))
    assert "train at once" not in err.getvalue()


def train_here(model: nn.Module, steps: int = 4) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g, losses = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def in_a_thread_that_lives_on(work) -> tuple[threading.Thread, threading.Event]:
    """`work` run in a thread that then waits until the event returned is set."""
    done, end = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (work(), done.set(), end.wait(10)), name="evaluator", daemon=True)
    thread.start()
    done.wait(10)
    return thread, end


def test_a_thread_that_only_ran_forwards_hands_the_watch_to_the_training(monkeypatch, tmp_path):
    """An evaluation thread runs the model with gradients on before the training starts in the
    main thread: it kept the watch for good ("no training step was seen", nothing said). The first
    backward of another thread takes it: every step of the training is stored."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    plain = train_here(copy.deepcopy(model))
    watch = auto.AutoWatch(str(tmp_path))
    thread, end = in_a_thread_that_lives_on(lambda: model(torch.randn(2, 4)))
    try:
        losses = train_here(model)
    finally:
        end.set(), thread.join(10)
        watch.detach()
    assert losses == plain
    stored = read_run(tmp_path)
    np.testing.assert_array_equal(stored.loss, np.array(losses))
    assert {layer.name for layer in stored.layers} == {"0", "1", "2"}  # (found once, with its own names)


def test_a_training_whose_steps_were_refused_is_named_when_nothing_was_stored(monkeypatch, tmp_path):
    """The followed thread took input gradients (a backward, no step) and lives on; the main
    thread's training was refused: "no training step was seen", nothing said of it. Its thread is
    named, and why."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    probe = copy.deepcopy(model).requires_grad_(False)
    watch = auto.AutoWatch(str(tmp_path))
    thread, end = in_a_thread_that_lives_on(lambda: probe(torch.randn(2, 4, requires_grad=True)).sum().backward())
    try:
        train_here(model)
    finally:
        end.set(), thread.join(10)
        watch.detach()
    said = err.getvalue()
    assert "nothing was recorded" in said and "here evaluator" in said and "of MainThread were ignored" in said


def test_a_training_whose_first_step_is_slow_keeps_the_watch_from_a_saliency_thread(tmp_path):
    """0.2 s between the first forward and backward (a warm-up): a thread taking input gradients of
    a frozen copy beside it took the watch, and the whole training was lost."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    frozen = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = auto.AutoWatch(str(tmp_path), warn=False, sample_every=1)
    stop, first = threading.Event(), threading.Event()

    def saliency():
        first.wait()
        while not stop.is_set():
            frozen(torch.randn(8, 4, requires_grad=True)).sum().backward()
            time.sleep(0.005)

    thread = threading.Thread(target=saliency, name="saliency")
    thread.start()
    losses = []
    try:
        for i in range(12):
            x = torch.randn(16, 4)
            out = model(x)
            if i == 0:
                first.set()
                time.sleep(0.2)
            loss = (out - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        stop.set()
        thread.join()
        watch.detach()
    stored = read_run(tmp_path)
    assert np.allclose(stored.loss, losses)


def test_a_step_after_a_backward_that_raised_is_recorded_in_its_place(tmp_path):
    """A gradient check raises in backward, the script catches it and steps on: that step was taken
    for an optimizer fused into backward (11 of 12 stored, each later one a step off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = auto.AutoWatch(str(tmp_path), warn=False, sample_every=1)
    losses = []

    def check(grad):
        raise RuntimeError("a gradient check")

    try:
        for i in range(12):
            x = torch.randn(16, 4)
            out = model(x)
            if i == 5:
                out.register_hook(check)
            loss = (out - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            try:
                loss.backward()
            except RuntimeError:
                pass
            opt.step()
            losses.append(loss.item())
    finally:
        watch.detach()
    stored = read_run(tmp_path).loss
    assert len(stored) == 12
    kept = [i for i in range(12) if i != 5]  # (the step whose backward raised stores no loss)
    assert np.allclose(stored[kept], np.array(losses)[kept])
