"""Zero-code watching of a process whose threads train at once (one ThreadPoolExecutor job per model)."""

import _thread
import copy
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


def test_a_thread_between_steps_keeps_the_watch_from_a_concurrent_training(monkeypatch, tmp_path):
    """The followed thread between two of its steps, another one's backward and step handed it the
    watch (its model found and hooked), and once the two were seen at once the recording stopped:
    1 run in 20 of two concurrent trainings stored nothing. The first thread keeps the watch while
    it lives: each of its steps is stored, none of the other's."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    a, b = Trainer(0), Trainer(1)
    try:
        a.do("forward", "backward", "step")
        b.do(*["forward", "backward", "step"] * 2)  # a between steps (alive, not waiting for b)
        for _ in range(4):
            a.do("forward", "backward")
            b.do("forward", "backward", "step")
            a.do("step")
    finally:
        watch.detach()
        a.end(), b.end()
    assert a.errors == b.errors == []
    assert a.losses == unwatched_losses(0, 5) and b.losses == unwatched_losses(1, 6)
    stored = read_run(tmp_path)
    np.testing.assert_array_equal(stored.loss, np.array(a.losses))
    assert {layer.name for layer in stored.layers} == {"0", "1", "2"}
    assert err.getvalue().count("train at once") == 1


def test_a_layer_shared_with_another_threads_training_records_the_followed_gradient(monkeypatch, tmp_path):
    """A first layer shared by two models trained at once in two threads: on a sampled step the
    other thread's forward through it hooked its output into the followed step's record, and its
    backward added its own ∂L/∂output there (0.054 stored for the followed training's 0.039). The
    hooks ignore other threads: the stored value is the followed thread's own (float64 recount)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    watch = auto.AutoWatch(str(tmp_path), sample_every=1)
    a, b = Trainer(0), Trainer(1)
    b.model[0] = a.model[0]
    b.opt = torch.optim.SGD(b.model.parameters(), lr=0.1)
    outputs = []
    a.model[0].register_forward_hook(lambda m, args, y: outputs.append(y.retain_grad() or y)
                                     if threading.current_thread() is a else None)
    try:
        a.do("forward", "backward", "step")  # (a training: see test_run_thread_rules, a forward is none)
        for _ in range(3):
            a.do("forward")
            b.do("forward", "backward", "step")
            a.do("backward", "step")
    finally:
        watch.detach()
        a.end(), b.end()
    assert a.errors == b.errors == []
    stored = read_run(tmp_path)
    np.testing.assert_array_equal(stored.loss, np.array(a.losses))
    own = [y.grad.double().pow(2).mean().sqrt().item() for y in outputs]
    np.testing.assert_allclose(stored.series("0", "grad_out_rms")[1], own, rtol=1e-5)


def test_a_backward_in_another_thread_during_the_followed_one_adds_no_gradient(monkeypatch, tmp_path):
    """Another thread's backward through a shared layer, run while the followed thread's backward
    is under way (after the layer's gradient was taken): the watch's gradient hook ran in that
    thread too and overwrote the followed step's norm with the sum of both. The followed gradient
    is stored (float64 recount)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    watch = auto.AutoWatch(str(tmp_path))
    a = Trainer(0)
    a.model = nn.Sequential(nn.Linear(4, 1100), nn.Tanh(), nn.Linear(1100, 1))  # (a weight read in its hook)
    a.opt = torch.optim.SGD(a.model.parameters(), lr=0.1)
    weight = a.model[0].weight  # (shared with the other thread's computation; the bias is a's alone)
    expected = []
    try:
        a.do("forward")  # its model found: the watch's hooks come first
        inside = threading.Event()

        def meanwhile(p):
            if threading.current_thread() is a and not inside.is_set():
                inside.set()
                t = threading.Thread(target=lambda: (torch.randn(8, 4) @ weight.T).pow(2).mean().backward())
                t.start(), t.join()
        weight.register_post_accumulate_grad_hook(meanwhile)
        for _ in range(3):
            inside.clear()
            x, y = a.data[len(a.losses)]
            model = copy.deepcopy(a.model).double()
            grads = torch.autograd.grad(nn.functional.mse_loss(model(x.double()), y.double()), model[0].parameters())
            expected.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
            a.do("backward", "step", "forward")
    finally:
        watch.detach()
        a.end()
    assert a.errors == []
    np.testing.assert_allclose(read_run(tmp_path).series("0", "grad_norm")[1], expected, rtol=1e-5)


def tried_then_trained(run_in, run_dir, steps: int = 6) -> tuple[list[float], list[float]]:
    """A forward and backward in this thread (a check that gradients flow: cleared, no step), then
    the training, run by `run_in(train)`: the losses, and those stored."""
    run_dir.mkdir()
    watch = auto.AutoWatch(str(run_dir))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        model(torch.randn(2, 4)).sum().backward()
        opt.zero_grad()
        losses = []

        def train():
            for _ in range(steps):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                opt.zero_grad(), loss.backward(), opt.step()
                losses.append(loss.item())
        run_in(train)
    finally:
        watch.detach()
    return losses, list(read_run(run_dir).loss)


def in_a_joined_thread(train) -> None:
    worker = threading.Thread(target=train)
    worker.start(), worker.join()


def in_a_pools_job(train) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(train).result()


def test_a_model_tried_in_one_thread_then_trained_in_another_is_recorded(monkeypatch, tmp_path):
    """The try's backward, no optimizer step after it, left the main thread mid-step, and the
    worker's steps were "a second training at once": 1 of 101 stored. The main thread waits for
    the worker (its join(), the job's future): the watch is the worker's from its first call, and
    the run is stored as in one thread (in the same order, at a pool's job's first step too)."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    alone = tried_then_trained(lambda train: train(), tmp_path / "alone")
    assert alone[1] == alone[0]
    for name, run_in in (("joined", in_a_joined_thread), ("pool", in_a_pools_job)):
        assert tried_then_trained(run_in, tmp_path / name) == alone, name
    assert err.getvalue() == ""


def test_jobs_one_after_another_in_two_pools_are_each_recorded(monkeypatch, tmp_path):
    """A job trained in one pool's worker, then another in a second pool's, the first worker alive
    between jobs: the second job's training is recorded after the first's, as in one thread."""
    from concurrent.futures import ThreadPoolExecutor

    def jobs(run_one) -> list[float]:
        losses = []

        def train(seed: int) -> None:
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(4):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                opt.zero_grad(), loss.backward(), opt.step()
                losses.append(loss.item())
        run_one(train)
        return losses

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    try:
        with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
            losses = jobs(lambda train: (first.submit(train, 0).result(), second.submit(train, 1).result()))
    finally:
        watch.detach()
    assert losses == jobs(lambda train: (train(0), train(1)))
    np.testing.assert_array_equal(read_run(tmp_path).loss, np.array(losses))
    assert "train at once" not in err.getvalue()


def test_a_training_in_a_thread_another_one_started_is_recorded(monkeypatch, tmp_path):
    """The main thread joins a thread that is not the one training (a launcher's, a test driver's):
    the watch passes once the training thread has taken two whole steps in that one wait; its
    later steps are stored."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    trainer = Trainer(0)
    try:
        trainer.model(torch.randn(2, 4)).sum().backward()  # (a try, in this thread)
        trainer.opt.zero_grad()
        driver = threading.Thread(target=lambda: trainer.do(*["forward", "backward", "step"] * 6))
        driver.start(), driver.join()
    finally:
        watch.detach()
        trainer.end()
    assert trainer.errors == [] and err.getvalue() == ""
    assert trainer.losses == unwatched_losses(0, 6)
    assert list(read_run(tmp_path).loss) == trainer.losses[2:]


def test_a_thread_reaching_the_watch_while_the_process_dies_is_held(monkeypatch):
    """Dying of SIGTERM, the process stores its last steps from one thread: a training thread ran
    on meanwhile (2 steps taken, never stored). Its next call into the watch waits instead."""
    monkeypatch.setattr(one_thread, "HOLD", 0.01)
    followed = one_thread.TrainingThread(lambda *threads: None)
    assert followed.mine()
    followed.hold()
    seen = []
    other = threading.Thread(target=lambda: seen.append(followed.mine()))
    other.start(), other.join()
    assert seen == [False] and followed.mine()


def test_autograds_device_threads_are_the_followed_backwards(monkeypatch):
    """On a GPU autograd runs the hooks of a backward in threads of its own (no Python thread): one
    stepping a fused optimizer there inside the followed thread's backward was "another thread's
    training", refused and said at once. Inside that backward it is the followed thread's; outside,
    refused, it is never taken for another training (its later hooks ignored)."""
    def from_a_device_thread(followed: one_thread.TrainingThread) -> bool:
        done, seen = _thread.allocate_lock(), []
        done.acquire()
        _thread.start_new_thread(lambda: (seen.append(followed.mine()), done.release()), ())
        done.acquire()
        return seen[0]
    inside = [True]
    said = []
    followed = one_thread.TrainingThread(lambda *threads: said.append(threads), inside=lambda: inside[0])
    assert followed.mine()
    assert from_a_device_thread(followed)
    inside[0] = False
    assert not from_a_device_thread(followed)
    assert followed.mine() and followed.foreign == set() and said == []


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


def test_no_torch_func_message_when_another_thread_has_the_watch(monkeypatch, tmp_path):
    """The watch followed a thread that ran only a forward (and lives on) before any step was
    stored: the trainer's backward passes, refused, left "no backward pass... torch.func" said of a
    training by loss.backward()."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    watch = auto.AutoWatch(str(tmp_path))
    watch.the_command = True
    trainer = Trainer(0)
    try:
        trainer.model(torch.randn(2, 4))  # its model found, in this thread
        trainer.do("forward", "backward", "step", "forward", "backward", "step")
    finally:
        watch.detach()
        trainer.end()
    assert trainer.errors == [] and "torch.func" not in err.getvalue()
