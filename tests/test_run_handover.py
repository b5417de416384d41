"""Zero-code watching: a thread that ran only forwards (a teacher's, a reference net's) hands the watch
to the training thread, and the run is stored as if that thread had never run."""

import copy
import io
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.collect import auto, one_thread
from gradwatch.store import read_run

# the statistics a sampled step's forward takes: none for a step whose forward ran before the watch was this thread's
FORWARD_ONLY = {"act_mean", "act_std", "dead", "saturated", "grad_out_rms"}
# ... and those from its backward on: none for a step whose backward was refused (read at its step, the
# gradients would be what the script made of them since: clipped, a false drop)
BACKWARD_ONLY = {"grad_norm", "grad_max", "nonfinite", "weight_norm", "update_ratio"}


def net(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def started(work: Callable[[], None], ident: int | None = None) -> threading.Thread:
    """A thread running `work`; with `ident`, one that has it (an ended thread's, whose stack the new
    one reuses: threads are started until one does)."""
    for _ in range(200):
        decided, chosen = threading.Event(), []
        thread = threading.Thread(target=lambda: decided.wait(10) and chosen and work(), name="reference")
        thread.start()
        if ident is None or thread.ident == ident:
            chosen.append(True)
        decided.set()
        if chosen:
            return thread
        thread.join(10)
    pytest.skip("no new thread took the ended thread's ident")


def teacher_then_waits(teacher: nn.Module, ident: Callable[[], int | None] = lambda: None):
    """A thread that runs the teacher twice with gradients on, then waits (idle) to be told to end:
    the training's first backward takes the watch. `ident()`: the thread's (see `started`)."""
    def start() -> Callable[[], None]:
        ran, end = threading.Event(), threading.Event()

        def work() -> None:
            teacher(torch.randn(8, 4)), teacher(torch.randn(8, 4))
            ran.set()
            end.wait(10)
        thread = started(work, ident())
        ran.wait(10)
        return lambda: (end.set(), thread.join(10))
    return start


def teacher_while_busy(teacher: nn.Module, told: threading.Event, done: threading.Event):
    """A thread that runs the teacher once, then is busy (not idle) until `told`, runs it twice more
    (the forward that took the watch is not counted: two make a thread that only runs forwards),
    says `done`: the training's first backward, between, is refused, and its step takes the watch."""
    def start() -> Callable[[], None]:
        ran, end = threading.Event(), threading.Event()

        def work() -> None:
            teacher(torch.randn(8, 4))
            ran.set()
            while not told.is_set():
                time.sleep(0.001)
            teacher(torch.randn(8, 4)), teacher(torch.randn(8, 4))
            done.set()
            while not end.is_set():
                time.sleep(0.001)
        thread = threading.Thread(target=work, name="reference")
        thread.start()
        ran.wait(10)
        return lambda: (end.set(), thread.join(10))
    return start


def train(model: nn.Module, steps: int = 6, between: Callable[[int], None] = lambda i: None,
          scaled: bool = False, opt: torch.optim.Optimizer | None = None) -> list[float]:
    """`scaled`: under a GradScaler (its step unscales the gradients before the optimizer's)."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=scaled)
    g, losses = torch.Generator().manual_seed(1), []
    for i in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        between(i)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return losses


def watched(run_dir, work: Callable[[], list[float]], beside: Callable[[], Callable[[], None]] | None = None):
    """`work()` under a zero-code watch, `beside()` started first (it returns how to end it)."""
    run_dir.mkdir()
    watch = auto.AutoWatch(str(run_dir), warn=False, sample_every=2)
    end = beside() if beside is not None else lambda: None
    try:
        losses = work()
    finally:
        end()
        watch.detach()
    return losses, read_run(run_dir)


def assert_same_store(stored, alone, forward_missed: int, backward_missed: bool = False) -> None:
    """The same layers (names, forward order), steps, losses and statistics; the forward-only
    statistics of step `forward_missed` (whose forward ran before the watch was the training's; -1:
    none) aside, and its backward's too if `backward_missed`."""
    assert [(l.name, l.index) for l in stored.layers] == [(l.name, l.index) for l in alone.layers]
    np.testing.assert_array_equal(stored.steps, alone.steps)
    np.testing.assert_array_equal(stored.loss, alone.loss)
    assert set(stored.metrics) == set(alone.metrics)
    row = list(alone.steps).index(forward_missed) if forward_missed >= 0 else None
    for name, values in alone.metrics.items():
        ours = stored.metrics[name]
        if (name in FORWARD_ONLY or backward_missed and name in BACKWARD_ONLY) and row is not None:
            assert np.isnan(ours[row]).all(), name
            ours, values = np.delete(ours, row, 0), np.delete(values, row, 0)
        np.testing.assert_allclose(ours, values, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("at, scaled", [("backward", False), ("step", False), ("step", True)])
def test_a_teacher_run_in_another_thread_before_the_training_leaves_no_trace(monkeypatch, tmp_path, at, scaled):
    """A thread runs a teacher with gradients on before the training starts in the main thread: the
    teacher's layers (never trained, all NaN) were stored and took the plain names, the trained
    model's were prefixed (`model.0`), and step 0 had no loss or gradients. Stored now as without
    that thread, whether the watch passes at the first backward or (that one refused) at the step,
    under a GradScaler too."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    torch.manual_seed(0)
    teacher, model, start = net(6), net(8), net(8).state_dict()
    told, done = threading.Event(), threading.Event()
    if at == "backward":
        beside, between = teacher_then_waits(teacher), lambda i: None
    else:
        beside = teacher_while_busy(teacher, told, done)
        between = lambda i: (told.set(), done.wait(10)) if i == 0 else None
    model.load_state_dict(start)
    losses, stored = watched(tmp_path / "beside", lambda: train(model, between=between, scaled=scaled), beside)
    model.load_state_dict(start)
    alone_losses, alone = watched(tmp_path / "alone", lambda: train(model, scaled=scaled))
    model.load_state_dict(start)
    assert losses == alone_losses == train(model, scaled=scaled)  # (and watching changed nothing)
    assert [l.name for l in stored.layers] == ["0", "1", "2"]
    assert_same_store(stored, alone, forward_missed=0, backward_missed=at == "step")
    assert err.getvalue() == ""
    assert not teacher._forward_hooks and all(not p._post_accumulate_grad_hooks for p in teacher.parameters())


@pytest.mark.parametrize("same_ident", [False, True])
def test_models_trained_before_keep_their_data_when_a_forward_only_thread_hands_over(
        monkeypatch, tmp_path, same_ident):
    """A worker trains a model and ends (within the first steps, while models are still looked for);
    an evaluation thread then takes the watch at its forwards of a teacher and waits; the main
    thread trains a second model. The first model's steps are kept as they were, the teacher
    leaves nothing, the second model's steps are all stored. Also when the evaluation thread has
    the worker's ident: it was taken for the worker (trained), kept the watch, and the second
    training was refused (1 step of 5 stored)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    torch.manual_seed(0)
    first, teacher, second = net(8), net(6), net(5)
    starts = [copy.deepcopy(first.state_dict()), copy.deepcopy(second.state_dict())]

    def both(beside) -> Callable[[], list[float]]:
        def work() -> list[float]:
            first.load_state_dict(starts[0]), second.load_state_dict(starts[1])
            losses = []
            worker = threading.Thread(target=lambda: losses.extend(train(first, steps=1)), name="pretrain")
            worker.start(), worker.join()
            idents.append(worker.ident)
            end = beside() if beside is not None else lambda: None
            try:
                return losses + train(second, steps=4)
            finally:
                end()
        return work

    idents = []
    losses, stored = watched(tmp_path / "beside", both(teacher_then_waits(teacher, lambda: same_ident and idents[-1] or None)))
    alone_losses, alone = watched(tmp_path / "alone", both(None))
    assert losses == alone_losses and len(stored.loss) == 5
    assert [l.name for l in stored.layers] == ["0", "1", "2", "model.0", "model.1", "model.2"]
    assert_same_store(stored, alone, forward_missed=1)


def test_a_thread_running_a_new_model_each_time_keeps_a_few(tmp_path):
    """A thread not followed that builds and runs a new model each time (a reference net made per
    batch) keeps only the latest few, for a handover at its backward (not one per call)."""
    watch = auto.AutoWatch(str(tmp_path), warn=False)
    try:
        net(4)(torch.randn(2, 4))  # (this thread takes the watch)
        made = [net(3) for _ in range(3 * one_thread.KEPT)]  # (held: a dead one goes first)
        thread = threading.Thread(target=lambda: [m(torch.randn(2, 4)) for m in made])
        thread.start(), thread.join()
        kept = [ref() for ref in watch._unfollowed[thread.ident].models]
        assert len(kept) == one_thread.KEPT and all(a is b for a, b in zip(kept, made[-one_thread.KEPT:]))
    finally:
        watch.detach()


def fused_training(between: Callable[[], None] = lambda: None, steps: int = 4) -> list[float]:
    """An optimizer fused into backward (torch's recipe: a gradient hook per parameter steps it and
    clears its gradient); `between()` at the first one."""
    torch.manual_seed(0)
    model = net(8)
    opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}
    first = []

    def fused(p: torch.Tensor) -> None:
        if not first:
            first.append(between())
        opts[p].step()
        opts[p].zero_grad()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(fused)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
    return losses


def test_an_optimizer_fused_into_backward_takes_the_watch_at_its_first_step(monkeypatch, tmp_path):
    """The training's backward refused (a teacher's thread had the watch), the watch passes at the
    first optimizer step inside it: that backward was taken as ended there, each later step in it
    as another optimizer's (only step 0 stored). Stored as without the teacher's thread."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    teacher, told, done = net(6), threading.Event(), threading.Event()
    beside = teacher_while_busy(teacher, told, done)
    losses, stored = watched(tmp_path / "beside", lambda: fused_training(lambda: (told.set(), done.wait(10))), beside)
    alone_losses, alone = watched(tmp_path / "alone", fused_training)
    assert losses == alone_losses == fused_training()
    assert [l.name for l in stored.layers] == ["0", "1", "2"]
    np.testing.assert_array_equal(stored.steps, alone.steps)
    np.testing.assert_array_equal(stored.loss, alone.loss)
    np.testing.assert_allclose(stored.metrics["grad_norm"], alone.metrics["grad_norm"], rtol=1e-6)


def test_a_reference_net_run_before_a_pools_training_leaves_no_trace(monkeypatch, tmp_path):
    """The main thread runs a reference net with gradients on, then waits for a pool's job that
    trains a model: the job takes the watch as its optimizer is made; the reference net's layers
    stayed (never trained) with the plain names, the trained model's prefixed. Stored as without
    the reference net's forwards, step 0's forward too (an optimizer made before the main thread
    reached the job's result() was refused, and the watch passed at the backward)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    torch.manual_seed(0)
    reference, start = net(6), net(8).state_dict()

    def in_a_pool(first: Callable[[], None]) -> Callable[[], list[float]]:
        def work() -> list[float]:
            first()
            model = net(8)
            model.load_state_dict(start)
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(train, model).result()
        return work

    losses, stored = watched(tmp_path / "reference", in_a_pool(lambda: (reference(torch.randn(2, 4)),) * 2))
    alone_losses, alone = watched(tmp_path / "alone", in_a_pool(lambda: None))
    assert losses == alone_losses
    assert [l.name for l in stored.layers] == ["0", "1", "2"]
    assert_same_store(stored, alone, forward_missed=-1)


def _in_a_worker(work: Callable[[], list[float]]) -> Callable[[], list[float]]:
    """`work` run in a thread the main thread joins."""
    def run() -> list[float]:
        out: list[float] = []
        thread = threading.Thread(target=lambda: out.extend(work()), name="trainer")
        thread.start()
        thread.join()
        return out
    return run


@pytest.mark.parametrize("shared", [False, True])
def test_a_check_of_teacher_and_student_before_the_workers_training_leaves_the_student_alone(tmp_path, shared):
    """Main runs the teacher and the student once with gradients on (a first distillation loss), makes
    the optimizer, and a worker trains the student: making an optimizer counted as training, and the
    teacher's layers stayed (`teacher.0`...). `shared`: the two share a backbone, which ran in the
    student: the teacher (its head never trained) stayed too, under the plain names."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    student = nn.Sequential(backbone if shared else nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 1))
    teacher = nn.Sequential(backbone, nn.Linear(8, 1)) if shared else net(6)
    start = copy.deepcopy(student.state_dict())

    def work(check: bool) -> list[float]:
        student.load_state_dict(start)
        if check:
            x = torch.randn(2, 4)
            (student(x) - teacher(x)).pow(2).mean()
        opt = torch.optim.SGD(student.parameters(), lr=0.05)
        return _in_a_worker(lambda: train(student, opt=opt))()

    losses, stored = watched(tmp_path / "checked", lambda: work(True))
    alone_losses, alone = watched(tmp_path / "alone", lambda: work(False))
    assert losses == alone_losses
    assert_same_store(stored, alone, forward_missed=0)


def test_a_thread_with_an_ended_threads_ident_takes_up_nothing_of_it(tmp_path):
    """Main checks the model's shape (it takes the watch); a short thread runs the teacher (gradients
    on) and ends; the worker that trains gets its ident: the teacher's forwards were taken for the
    worker's, and the teacher found, its layers stored."""
    torch.manual_seed(0)
    teacher, model = net(6), net(8)
    start = copy.deepcopy(model.state_dict())

    def work(first: bool) -> list[float]:
        model.load_state_dict(start)
        model(torch.zeros(2, 4))
        ident = None
        if first:
            evaluation = started(lambda: (teacher(torch.randn(8, 4)), teacher(torch.randn(8, 4))))
            evaluation.join(10)
            ident = evaluation.ident
        opt, out = torch.optim.SGD(model.parameters(), lr=0.05), []
        trainer = started(lambda: out.extend(train(model, opt=opt)), ident)
        trainer.join(10)
        return out

    losses, stored = watched(tmp_path / "reused", lambda: work(True))
    alone_losses, alone = watched(tmp_path / "alone", lambda: work(False))
    assert losses == alone_losses and [l.name for l in stored.layers] == ["0", "1", "2"]
    assert_same_store(stored, alone, forward_missed=-1)


def test_an_ensemble_trained_in_a_worker_keeps_each_models_step_0_and_name(tmp_path):
    """Twelve models trained in one worker after main ran one of them: more than the few an
    unfollowed thread once kept (two lost step 0), each named by the loop's variable at its forward."""
    torch.manual_seed(0)
    models = [net(4) for _ in range(12)]
    start = [copy.deepcopy(m.state_dict()) for m in models]

    def work(check: bool) -> list[float]:
        for m, s in zip(models, start):
            m.load_state_dict(s)
        if check:
            models[0](torch.randn(2, 4))
        opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.05)

        def ensemble() -> list[float]:
            g, losses = torch.Generator().manual_seed(1), []
            for _ in range(3):
                x = torch.randn(16, 4, generator=g)
                loss = sum((m(x) - x.sum(1, keepdim=True)).pow(2).mean() for m in models)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses
        return _in_a_worker(ensemble)()

    losses, stored = watched(tmp_path / "checked", lambda: work(True))
    alone_losses, alone = watched(tmp_path / "alone", lambda: work(False))
    assert losses == alone_losses and len(stored.layers) == 36
    assert_same_store(stored, alone, forward_missed=0)
