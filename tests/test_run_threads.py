"""Zero-code watching of a process whose threads train at once (one ThreadPoolExecutor job per model)."""

import io
import queue
import sys
import threading

import numpy as np
import torch
from torch import nn

from gradwatch.collect import auto, one_thread
from gradwatch.store import read_run


class Trainer(threading.Thread):
    """A training loop in a thread of its own, one part of a step at a time, when told: the test
    decides how two trainings interleave."""

    def __init__(self, seed: int):
        super().__init__(name=f"trainer-{seed}", daemon=True)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(8)]
        self.losses: list[float] = []
        self.errors: list[BaseException] = []
        self._todo: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self.start()

    def do(self, *parts: str) -> None:
        for part in parts:
            self._todo.put(part)
            self._done.get(timeout=30)

    def run(self) -> None:
        while (part := self._todo.get()) is not None:
            try:
                getattr(self, part)()
            except BaseException as exc:  # (the test asserts there were none)
                self.errors.append(exc)
            self._done.put(part)

    def forward(self) -> None:
        x, y = self.data[len(self.losses)]
        self.loss = nn.functional.mse_loss(self.model(x), y)

    def backward(self) -> None:
        self.opt.zero_grad()
        self.loss.backward()

    def step(self) -> None:
        self.opt.step()
        self.losses.append(self.loss.item())

    def end(self) -> None:
        self._todo.put(None)
        self.join(30)


def unwatched_losses(seed: int, steps: int) -> list[float]:
    trainer = Trainer(seed)
    trainer.do(*["forward", "backward", "step"] * steps)
    trainer.end()
    return trainer.losses


def test_two_threads_training_at_once_record_one_and_say_so(monkeypatch, tmp_path):
    """Two models trained at once in two threads: their forwards, backwards and steps went into one
    step record, and the exit flush failed with a traceback (3 of 80 steps stored; in another
    interleaving the script's own backward raised IndexError). The thread that trained first is
    recorded, the other is said once not to be, and neither training changes."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    a, b = Trainer(0), Trainer(1)
    try:
        for _ in range(6):  # b's whole step inside a's, between a's backward and a's optimizer step
            a.do("forward", "backward")
            b.do("forward", "backward", "step")
            a.do("step")
    finally:
        watch.detach()
        a.end(), b.end()
    assert a.errors == b.errors == []
    assert a.losses == unwatched_losses(0, 6) and b.losses == unwatched_losses(1, 6)  # bit for bit
    stored = read_run(tmp_path)
    np.testing.assert_array_equal(stored.loss, np.array(a.losses))
    assert {layer.name for layer in stored.layers} == {"0", "1", "2"}  # a's model only (b's: prefixed)
    said = err.getvalue()
    assert said.count("train at once") == 1
    assert "trainer-0 and trainer-1 train at once; zero-code watching records one training per process: trainer-0's" in said


def test_a_model_found_in_each_thread_stops_the_recording_cleanly(monkeypatch, tmp_path):
    """Each thread's model found while the other was between steps (their first steps one after
    the other, then at once): both have hooks, and their gradients would mix in one record. The
    recording stops, said, and neither training is disturbed. (A forward never takes the watch
    from a live thread: b's model is found at its second step, the first one b's backward took.)"""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    a, b = Trainer(0), Trainer(1)
    try:
        a.do("forward", "backward", "step")
        b.do(*["forward", "backward", "step"] * 2)  # a between steps: b takes the watch over (a sweep's next job)
        for _ in range(4):
            a.do("forward", "backward")  # b between steps: a takes it back
            b.do("forward", "backward", "step")  # a mid-step: two at once
            a.do("step")
    finally:
        watch.detach()
        a.end(), b.end()
    assert a.errors == b.errors == []
    assert a.losses == unwatched_losses(0, 5) and b.losses == unwatched_losses(1, 6)
    assert "cannot tell their steps apart: it stopped recording at step" in err.getvalue()


def test_a_thread_reaching_the_watch_while_the_process_dies_is_held(monkeypatch):
    """Dying of SIGTERM, the process stores its last steps from one thread: a training thread ran
    on meanwhile (2 steps taken, never stored). Its next call into the watch waits instead."""
    monkeypatch.setattr(one_thread, "HOLD", 0.01)
    followed = one_thread.TrainingThread(lambda: False, lambda *threads: None)
    assert followed.mine()
    followed.hold()
    seen = []
    other = threading.Thread(target=lambda: seen.append(followed.mine()))
    other.start(), other.join()
    assert seen == [False] and followed.mine()


def test_a_training_by_torch_func_is_said_to_be_unwatchable(monkeypatch, tmp_path):
    """Gradients by torch.func.grad of a functional_call, the weights updated by hand: no backward
    pass, no optimizer step, nothing recorded, and `gradwatch run` said only "no training step was
    seen". The process now says why. A training by loss.backward() says nothing of the kind."""
    from torch.func import functional_call, grad

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    for by_func in (True, False):
        (tmp_path / str(by_func)).mkdir()
        watch = auto.AutoWatch(str(tmp_path / str(by_func)))
        watch.the_command = True  # (the process `gradwatch run` started)
        trainer = Trainer(0)
        params = {k: v.detach() for k, v in trainer.model.named_parameters()}
        for x, y in trainer.data[:3]:
            if by_func:
                loss = lambda p: nn.functional.mse_loss(functional_call(trainer.model, p, (x,)), y)  # noqa: E731
                params = {k: v - 0.1 * g for (k, v), g in zip(params.items(), grad(loss)(params).values())}
            else:
                trainer.do("forward", "backward", "step")
        watch.detach()
        trainer.end()
        # (said once, for the first process only)
        assert err.getvalue().count("no backward pass (loss.backward()) and no optimizer step were seen") == 1


def test_a_forward_in_another_thread_is_no_second_training(monkeypatch, tmp_path):
    """A module run in another thread while the step is under way (nn.DataParallel's replicas, a
    prefetching thread's preprocessing) trains nothing there: it is neither a model nor said to be
    a second training."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    a, b = Trainer(0), Trainer(1)
    try:
        for _ in range(3):
            a.do("forward", "backward")
            b.do("forward")
            a.do("step")
    finally:
        watch.detach()
        a.end(), b.end()
    assert a.errors == b.errors == [] and err.getvalue() == ""
    assert {layer.name for layer in read_run(tmp_path).layers} == {"0", "1", "2"}


class Prefetcher(threading.Thread):
    """A prefetching thread that runs a transform made of nn.Modules (no weights, gradients on, as
    in a new thread) on each batch, ahead of the training loop (torchvision's transforms v2)."""

    def __init__(self, batches: list, ahead: int = 2):
        super().__init__(name="prefetch", daemon=True)
        self.batches, self.queue = batches, queue.Queue(maxsize=ahead)
        self.transform = nn.Sequential(nn.Identity(), nn.Flatten(1))
        self.start()

    def run(self) -> None:
        for x, y in self.batches:
            self.queue.put((self.transform(x), y))
        self.queue.put(None)


def train_prefetched(seed: int, steps: int) -> list[float]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    prefetch = Prefetcher([(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(steps)])
    losses = []
    while (batch := prefetch.queue.get(timeout=30)) is not None:
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    return losses


def test_a_prefetching_threads_transforms_never_take_the_watch(monkeypatch, tmp_path):
    """A prefetching thread's transform (nn.Modules, gradients on) ran before the script's first
    forward or between its steps, took the watch over, and the training was lost: 4 of 300 steps
    stored in three runs of five, or "threads prefetch and MainThread train at once... stopped
    recording at step 0" and a false "no backward pass" message. Every step is stored, nothing said."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    for run in range(3):  # (thread timing: a few interleavings)
        run_dir = tmp_path / str(run)
        run_dir.mkdir()
        watch = auto.AutoWatch(str(run_dir))
        watch.the_command = True
        try:
            losses = train_prefetched(0, 40)
        finally:
            watch.detach()
        assert losses == train_prefetched(0, 40)  # bit for bit
        np.testing.assert_array_equal(read_run(run_dir).loss, np.array(losses))
    assert err.getvalue() == ""


def test_no_torch_func_message_once_the_recording_stopped(monkeypatch, tmp_path):
    """Recording stopped (two threads' trainings mixed) before any step was stored: the backward
    passes, refused, left "no backward pass... torch.func" said of a training by loss.backward()."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    watch.the_command = True
    trainer = Trainer(0)
    try:
        trainer.do("forward")  # its model found
        watch._thread.stopped = True  # (as _two_threads stops it)
        trainer.do("backward", "step", "forward", "backward", "step")
    finally:
        watch.detach()
        trainer.end()
    assert trainer.errors == [] and "torch.func" not in err.getvalue()
