"""The one thread whose training a process's zero-code watch follows.

Global hooks (module forward, optimizer step, backward) fire in every thread, but a watch records
one training: two models trained at once in two threads (a ThreadPoolExecutor) had their forwards,
backwards and steps mixed into one step record, and the exit flush failed with a traceback (3 of
80 steps stored). The followed thread keeps the watch until it ends, waits for other threads to
end (`Thread.join`, a future's result) or, a pool's worker, for its next job: a worker's training
after the main thread's warm-up, jobs one after another; having run forwards only (an evaluation
thread), it gives it to another thread's backward or step. Other threads' backwards and steps are
refused, and the hooks on the followed training's own modules and weights ignore them too
(`foreign`: a shared layer, a handed-over model), but not modules run in helper threads inside
the followed forward. What a thread does meanwhile (`Unfollowed`: the models it runs, its
optimizers, its last backward) is taken up if it takes the watch.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType

HOLD = 5.0  # s another thread's training is held while the process dies of a signal (see `hold`)
WAIT_CALLS = 4  # another thread's backwards and steps (two whole steps) seen while the followed one waits
SETTLE = 0.05  # s (see `_settle`: paid once per thread training beside the followed one)
DEPTH = 16  # frames looked at from the top of the followed thread's stack
# where a thread waits for others to end: (module, function)
WAITS = {("threading", "join"), ("concurrent.futures._base", "result"),
         ("concurrent.futures._base", "wait"), ("concurrent.futures._base", "as_completed"),
         ("concurrent.futures.thread", "_worker")}  # (a pool's worker between jobs: none runs above it)
JOB = ("concurrent.futures.thread", "run")  # a pool's job, run by its worker
IDLE = {("threading", "wait"), ("queue", "get")}  # where a thread blocks waiting for work (an Event, a Queue)
KEPT = 32  # models, and optimizers, kept per thread not followed: the latest (see `Unfollowed`)


class TrainingThread:
    """`two_at_once(followed, other)`: called once, when another thread trains while the followed
    one does too (from the followed one); `handover(untrained, at)`: the watch passed to this
    call's thread, from one that ran no backward and no step since it took the watch
    (`untrained`), at this thread's "backward" or "step" (its forward ran unfollowed) or else
    before its model runs ("forward": at a forward, an optimizer made);
    `inside()`: the followed thread is inside its backward or optimizer step call; `forwarding()`:
    inside a model's forward. `foreign`: the idents of threads refused, whose calls the followed
    training's hooks ignore (one set lookup: see Watch._grad_hook)."""

    def __init__(self, two_at_once: Callable[[threading.Thread, threading.Thread], None],
                 handover: Callable[[bool, str], None] = lambda untrained, at: None,
                 inside: Callable[[], bool] = lambda: False,
                 forwarding: Callable[[], bool] = lambda: False):
        self.ident: int | None = None
        self.name = ""  # the followed thread's
        self._followed: threading.Thread | None = None  # ... itself (its ident outlives it: see `mine`)
        self.concurrent = False
        self.foreign: set[int] = set()
        self._holder: int | None = None
        self._two_at_once = two_at_once
        self._handover = handover
        self._inside = inside
        self._forwarding = forwarding
        self._lock = threading.Lock()
        self._waiting: tuple[FrameType | None, int] = (None, 0)  # (the join the followed thread waits in, calls seen)
        self._steppers: set[int] = set()  # threads whose optimizer step was refused (see `_hands_over`)
        self._forwards = 0  # top-level forwards with gradients on, since the followed thread took the watch
        self._trained = False  # the followed thread has run a backward or an optimizer step (see `_untrained`)
        self._waited: set[int] = set()  # threads that gave an untrained followed one SETTLE s (see `_untrained`)
        self.refused: dict[int, str] = {}  # ident -> name of the threads whose backward or step was refused
        self._settled: set[int] = set()  # threads whose first refusal waited for the followed one (`_settle`)
        self._rival: int | None = None  # a thread whose step was refused since the followed one's last

    def mine(self, claim: bool = True, proves: bool = True, starts: bool = False, takes: bool = False) -> bool:
        """This call's thread is the followed one. `claim`: a call that starts something (a forward,
        a backward, an optimizer step) takes the watch where no thread is followed or the followed
        one has ended; a backward or an optimizer step from another thread (`proves`; `starts`: a
        backward) also where the followed one waits for others to end (`_hands_over`). A forward
        never takes it from a live thread: nn.DataParallel's replicas, a prefetching thread's
        transforms (nn.Modules, run with gradients on) train nothing there; taking the watch between
        the script's steps, they lost 296 of its 300. Handing it over whenever the followed thread
        was between steps lost a concurrent training's recording in 1 run of 20 (the other's model
        found, its gradients mixed in): one thread ran 28 whole steps between two of the other's,
        so no count of steps tells a finished training from a slower one. `takes` (an optimizer
        made): not claiming, it takes the watch from a followed thread that has ended or waits for
        this one, so that the model it trains is found at its first forward."""
        ident = threading.get_ident()
        if self._holder not in (None, ident):
            time.sleep(HOLD)  # (the process dies meanwhile)
            return False
        if ident == self.ident and threading.current_thread() is self._followed:
            if not proves and claim and not self._forwarding():
                self._forwards += 1  # (a top-level forward with gradients on)
            if proves:
                self._trained = True
                if self._rival is not None:
                    self._at_once()
            return True
        if self.ident is None:
            return not claim or self._take(ident, None, _call(proves, starts))
        device = isinstance(threading.current_thread(), threading._DummyThread)
        if device and self._inside():
            return True  # autograd's device threads run the followed backward's hooks (CUDA)
        if not claim:
            return takes and self._awaited(ident) and self._take(ident, self.ident)
        followed = self._live_followed()
        if followed is None or proves and (self._untrained(ident) or self._hands_over(followed, ident, starts)):
            return self._take(ident, self.ident, _call(proves, starts))
        if device:
            return False  # (never foreign: the next backward's hooks run there too)
        if not proves:  # a forward: foreign unless inside the followed one's (see `_refused`)
            if not self._forwarding():
                self.foreign.add(ident)
            return False
        return self._refused(ident, step=not starts)

    def _refused(self, ident: int, step: bool) -> bool:
        """Another thread's backward or `step`, refused: its calls are foreign from now on (its
        forwards too, but those run inside the followed one's: modules run in helper threads
        there, branches in a pool, nn.DataParallel's parallel_apply, lost their activations, and
        a saturation found in one became a false stalled_layers). Only a step tells a training: a
        thread taking input gradients (saliency maps of a frozen copy) runs backwards and trains
        nothing."""
        self.foreign.add(ident)
        self.refused[ident] = threading.current_thread().name
        if step:
            self._steppers.add(ident)
            if not self.concurrent:
                self._rival = ident
        return False

    def _at_once(self) -> None:
        """The followed thread trains on after another one's refused backward or step, and that
        one lives: two trainings at once, said once. (Judged at the other's call, a worker's first
        backward before the main thread reached its join() was one.)"""
        other = _thread(self._rival)
        self._rival = None
        if other is not None and not self.concurrent:
            self.concurrent = True
            self._two_at_once(threading.current_thread(), other)

    def _take(self, ident: int, old: int | None, at: str = "forward") -> bool:
        """The watch passes to this thread (one taker, also when two threads claim at once), at its
        "backward", "step" or "forward" (an optimizer made too: `handover`)."""
        with self._lock:
            if self.ident != old:
                return self.ident == ident
            untrained, gone = not self._trained, self._live_followed()
            self.ident, self._waiting, self._rival, self._forwards = ident, (None, 0), None, 0
            self._trained = at != "forward"
            self._followed = threading.current_thread()
            self.name = self._followed.name
            self.foreign.discard(ident)
            self.refused.pop(ident, None)
            if gone is not None:
                self.foreign.add(old)
            if old is not None:
                self._handover(untrained, at)
        return True

    def _untrained(self, ident: int) -> bool:
        """The followed thread has run forwards only (an evaluation with gradients on, a shape
        check before the training starts in another thread), after SETTLE s given it once per
        other thread to reach its backward (a training caught between its forward and backward
        keeps the watch): another thread's backward or step takes it. It kept it for good, and
        the training was never recorded ("no training step was seen"). Not from a thread that has
        run one forward and is not idle: a training's first step can take longer than SETTLE (a
        warm-up, a sync before backward), and a thread taking saliency maps beside it took the
        whole training's watch."""
        if self._forwards < 2 and not _idle(self.ident):
            return False
        if not self._trained and ident not in self._waited:
            self._waited.add(ident)
            _within_settle(lambda: self._trained)
        return not self._trained

    def _hands_over(self, followed: threading.Thread, ident: int, starts: bool) -> bool:
        """The followed thread waits for others to end: at once if for this one (its `join`, the
        future of the pool job it runs), else at this thread's backward once WAIT_CALLS of its
        calls came in one same `join` (of a thread that started this one) and it has stepped.
        Never from inside its backward or step (a hook there joining a helper thread that runs a
        backward). Separate waits were counted as one (a frame's id is reused), and a future's
        result that another thread computes too: a training fetching each batch from a pool lost
        the watch to a thread taking saliency maps (84 to 133 of its 200 steps stored)."""
        if self._inside():
            return False
        wait = _wait_frame(sys._current_frames().get(followed.ident))
        if wait is None and ident not in self._settled:
            wait = self._settle(followed, ident)
        if wait is not None and _awaits(wait, ident):
            return True
        if wait is None or wait.f_code.co_name != "join":
            self._waiting = (None, 0)
            return False
        seen = self._waiting[1] + 1 if self._waiting[0] is wait else 1
        self._waiting = (wait, seen)  # (the frame itself, kept: its id is another call's once it ends)
        return starts and seen >= WAIT_CALLS and ident in self._steppers

    def _awaited(self, ident: int) -> bool:
        """The followed thread has ended, or waits for this one outside its backward and step
        (given SETTLE s to reach that wait, once: a pool's job making its optimizer before the
        submitting thread reached the job's `result()` was refused, and its first step's forward
        went unrecorded)."""
        followed = self._live_followed()
        if followed is None:
            return True
        if self._inside():
            return False
        wait = _wait_frame(sys._current_frames().get(followed.ident))
        if wait is None and ident not in self._settled:
            wait = self._settle(followed, ident)
        return wait is not None and _awaits(wait, ident)

    def _settle(self, followed: threading.Thread, ident: int) -> FrameType | None:
        """Once per thread: the followed one given SETTLE s to reach its wait. A worker started by
        `t.start(); t.join()` ran its first steps before the main thread got the GIL back to join
        (7 of 101 lost); a thread training beside it costs the other SETTLE s, once."""
        self._settled.add(ident)
        return _within_settle(lambda: _wait_frame(sys._current_frames().get(followed.ident)))

    def _live_followed(self) -> threading.Thread | None:
        """The followed thread, if it lives. Not looked up by its ident: a thread started after it
        ended often has it (the same stack reused), and was taken for it: an evaluation thread
        started after a worker's training inherited that training's watch, and the main thread's
        training that followed was refused, nothing stored."""
        followed = self._followed
        return followed if followed is not None and followed.is_alive() else None

    def followed(self) -> bool:
        """This call's thread is the one followed (not merely: none is followed yet)."""
        return self.ident == threading.get_ident() and threading.current_thread() is self._followed

    def hold(self, ident: int | None = None) -> None:
        """The process dies of a signal, its last steps stored by thread `ident` (this one if None):
        training in any other thread stops at its next forward, backward or step, as it would have
        at the signal without gradwatch (it ran on while the steps were stored: 2 more steps taken,
        never stored)."""
        self._holder = threading.get_ident() if ident is None else ident


class Unfollowed:
    """What a thread did while another was followed, for the watch to take up if this one takes it
    at its backward or step: the models its forwards ran (`ran`: a forward never takes the watch,
    so none was found, and the step's loss and gradients were lost), the optimizers it made
    (`made`), its last backward refused (`root`, until its step). Models and optimizers are held
    weakly, the latest KEPT of each (a thread making a model per batch)."""

    def __init__(self) -> None:
        self.thread = threading.current_thread()  # (its ident outlives it: a thread started later may have it)
        self.models: list[weakref.ref] = []
        self.called: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the script's name for it there
        self.inside: weakref.WeakSet = weakref.WeakSet()  # the models' modules
        self.optimizers: list[weakref.ref] = []
        self.root: object | None = None

    def ran(self, module, called: Callable[[], str | None]) -> None:
        """`module` (an nn.Module) ran, with gradients on: a model, unless it is in one that ran
        before or trains nothing; `called()`: the name the script calls it by there."""
        if module in self.inside or not any(p.requires_grad for p in module.parameters()):
            return
        self.models = _alive(self.models)
        if len(self.models) >= KEPT:  # the oldest no optimizer of this thread's trains goes first (an ensemble's stay)
            held = {id(p) for ref in self.optimizers if (opt := ref()) is not None
                    for group in opt.param_groups for p in group["params"]}
            untrained = [ref for ref in self.models
                         if (model := ref()) is None or not any(id(p) in held for p in model.parameters())]
            self.models.remove((untrained or self.models)[0])
            self.inside = weakref.WeakSet(m for ref in self.models if (model := ref()) is not None
                                          for m in model.modules())
        self.models.append(weakref.ref(module))
        self.inside.update(module.modules())
        if (name := called()) is not None:
            self.called[module] = name

    def made(self, optimizer) -> None:
        """`optimizer` was made, or given a parameter group."""
        if not any(ref() is optimizer for ref in self.optimizers):
            self.optimizers = [*_alive(self.optimizers)[1 - KEPT:], weakref.ref(optimizer)]


def unfollowed(table: dict[int, Unfollowed]) -> Unfollowed:
    """This thread's entry in `table`, made if it has none (and those of threads that ended dropped)."""
    here = table.get(threading.get_ident())
    if here is None or here.thread is not threading.current_thread():  # (an ended thread's, its ident reused)
        live = {t.ident for t in threading.enumerate()}
        for gone in [k for k in list(table) if k not in live]:
            table.pop(gone, None)
        here = table[threading.get_ident()] = Unfollowed()
    return here


def _alive(refs: list[weakref.ref]) -> list[weakref.ref]:
    return [ref for ref in refs if ref() is not None]


def _call(proves: bool, starts: bool) -> str:
    """What a call to `TrainingThread.mine` is: "backward", "step" or "forward"."""
    return "backward" if starts else "step" if proves else "forward"


def _within_settle(done: Callable[[], object]) -> object:
    """`done()` once it is true, or when SETTLE s have passed, the other threads run meanwhile."""
    deadline = time.monotonic() + SETTLE
    while not (value := done()) and time.monotonic() < deadline:
        time.sleep(SETTLE / 10)  # (lets the followed thread run)
    return value


def _wait_frame(frame: FrameType | None) -> FrameType | None:
    """The frame of `frame`'s stack that waits for other threads to end (see WAITS), if any; not
    above a pool's job that runs (the wait there, if any, is the job's own)."""
    return _frame_in(frame, WAITS, stop=JOB)


def _frame_in(frame: FrameType | None, places: set[tuple[str, str]],
              stop: tuple[str, str] | None = None) -> FrameType | None:
    """The first of the top DEPTH frames of `frame`'s stack that runs in one of `places` ((module,
    function)), before any that runs in `stop`."""
    for _ in range(DEPTH):
        if frame is None:
            return None
        where = (frame.f_globals.get("__name__"), frame.f_code.co_name)
        if where in places:
            return frame
        if where == stop:
            return None
        frame = frame.f_back
    return None


def _awaits(wait: FrameType, ident: int) -> bool:
    """`wait` (see WAITS) waits for this thread (`ident`): joins it, or awaits the future of the
    pool's job it runs; or is a pool's worker between jobs."""
    if wait.f_code.co_name == "_worker":
        return True
    if wait.f_code.co_name == "join":
        return getattr(wait.f_locals.get("self"), "ident", None) == ident
    job = _job()
    if job is None:
        return False
    if wait.f_code.co_name == "result":
        return wait.f_locals.get("self") is job
    return any(f is job for f in wait.f_locals.get("fs") or ())


def _job() -> object | None:
    """The future of the thread pool's job this thread runs, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) == JOB:
            return getattr(frame.f_locals.get("self"), "future", None)
        frame = frame.f_back
    return None


def _thread(ident: int) -> threading.Thread | None:
    """The live thread of id `ident`, if any."""
    return next((t for t in threading.enumerate() if t.ident == ident and t.is_alive()), None)


def _idle(ident: int | None) -> bool:
    """The thread blocks in a threading wait (an Event, a Condition, a Queue's get)."""
    return _frame_in(sys._current_frames().get(ident), IDLE) is not None
