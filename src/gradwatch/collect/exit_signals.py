"""SIGTERM and SIGHUP in zero-code mode: store the steps since the last flush, then die of the
signal as the process would without gradwatch.

The start-up hook (_bootstrap) installs the handler in the command `gradwatch run` started, and
puts the default back in forked children; `install` adds it in the processes that command starts.
The watch is duck-typed (collect/auto.py's AutoWatch): this module knows its flags, not its class.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

FLUSH_MARK = "_gradwatch_flush"  # on the handlers gradwatch installs (the start-up hook's too: _bootstrap)
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
STEP_WAIT = 5.0  # s a signal waits for a training thread's step to end (see _die_after_step)


def _no_watch() -> None:
    return None


_own_watch: Callable[[], object | None] = _no_watch  # this process's watch (set by `install`)


def install(own_watch: Callable[[], object | None]) -> None:
    """SIGTERM (`kill`, a scheduler's time limit, `gradwatch run` passing one on) and SIGHUP (the
    terminal closed, an ssh session dropped: sent to the whole process group, the script too) end
    Python without atexit: the handler stores the steps of `own_watch()` first. Installed where the
    default was left, from the main thread only (Python refuses elsewhere). The script setting the
    default puts it back (_bootstrap's stand-in)."""
    global _own_watch
    _own_watch = own_watch
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        on_signal(signum)

    setattr(handler, FLUSH_MARK, True)
    stand_in = getattr(signal.signal, "stand_in", {})
    for signum in SIGNALS:
        if _getsignal(signum) is signal.SIG_DFL:
            _setsignal(signum, handler)
            stand_in[signum] = handler


def _getsignal(signum: int) -> object:
    """The handler really installed: the start-up hook has `signal.getsignal` say SIG_DFL for
    gradwatch's, and `signal.signal` put it back for SIG_DFL (_bootstrap: scripts see what they
    would see without gradwatch)."""
    return getattr(signal.getsignal, "__wrapped__", signal.getsignal)(signum)


def _setsignal(signum: int, handler: object) -> object:
    return getattr(signal.signal, "__wrapped__", signal.signal)(signum, handler)


def on_signal(signum: int) -> None:
    """A SIGTERM or SIGHUP reached gradwatch's handler (in the main thread). Only by a process
    with a watch of its own, not by a forked worker that inherits it (nor by a fork Pool's, which
    `Pool.__exit__` ends with a SIGTERM). A script's handler never chains to it: the handler it
    finds there is SIG_DFL (_bootstrap)."""
    watch = _own_watch()
    if watch is None:
        _die_by_default(signum)
    elif watch._busy and watch._dist is None:  # (a collective's flush could wait forever)
        watch._deferred_signal = signum
    elif _mid_step_elsewhere(watch):
        _die_after_step(watch, signum)
    else:
        _die_of(watch, signum)


def _mid_step_elsewhere(watch) -> bool:
    """The steps end in another thread, alive and inside a step (between its first forward or
    backward and its optimizer step's end). A thread that has ended, or waits between steps, has
    nothing under way: waiting for its next step's end cost the full STEP_WAIT (5.05 s after the
    SIGTERM, where 0.06 s before) and lost every step, the training thread being long joined."""
    ident = watch.step_thread
    if ident in (None, threading.main_thread().ident):
        return False
    alive = any(t.ident == ident and t.is_alive() for t in threading.enumerate())
    return alive and (watch._cur is not None or watch._in_step or watch._backward_since_step)


def flush_before_waiting() -> bool:
    """Before a multiprocessing worker waits for work (_bootstrap: SimpleQueue.get), its steps
    are stored, so a SIGTERM meanwhile may kill it by default. False where that cannot be done
    now (mid-step: a backward awaits its optimizer step), and its handler must stay."""
    watch = _own_watch()
    if watch is None:
        return True
    if watch._backward_since_step or watch.step_thread not in (None, threading.get_ident()):
        return False
    with contextlib.suppress(Exception):  # (what was flushed before stays)
        watch.flush()
    return True


def _die_after_step(watch, signum: int) -> None:
    """The training runs in another thread (a server's or a GUI's worker), which Python never runs
    handlers in: flushing here, under its step, would break the step. That thread stores the steps
    when its step ends (AutoWatch._end_step); after STEP_WAIT they are stored from here (dying
    anyway, a step cut short is the most that can break)."""
    _setsignal(signum, signal.SIG_IGN)  # (a second one meanwhile: see _die_of)
    done = threading.Event()
    watch.flush_requested = done
    if done.wait(STEP_WAIT):
        _die_by_default(signum)
    else:
        watch.flush_requested = None
        _die_of(watch, signum)


def _die_of(watch, signum: int) -> None:
    """Store the steps since the last flush, then die of `signum` as without gradwatch. A second
    one meanwhile is ignored: sent to the process group (Slurm's time limit, `kill -TERM -PGID`),
    the signal reaches the script twice, once passed on by `gradwatch run`, and the second
    ended the flush the first began."""
    _setsignal(signum, signal.SIG_IGN)
    watch.hold_training()  # (training in another thread stops, as the signal would have stopped it)
    with contextlib.suppress(Exception):  # dying anyway: what was flushed before stays
        watch.abandon_collectives(f"it ended on {signal.Signals(signum).name}")  # torchrun's, after another rank failed
        store_last_steps(watch)
    _die_by_default(signum)


def _die_by_default(signum: int) -> None:
    """Die of `signum` as the process would without gradwatch."""
    _setsignal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def store_last_steps(watch) -> None:
    """Detach `watch`, storing its last steps, with Ctrl-C and SIGCHLD set aside in the main thread:
    a second Ctrl-C (from the terminal and from `gradwatch run`) would cut the flush short, and a
    DataLoader's SIGCHLD handler raises in it when its workers die of the same signal (Slurm's
    SIGTERM to the whole job: 50 of 76 steps stored)."""
    held = {signal.SIGINT: signal.SIG_IGN}
    if hasattr(signal, "SIGCHLD"):
        held[signal.SIGCHLD] = signal.SIG_DFL  # (not SIG_IGN: children would be reaped unwaited)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, h) for s, h in held.items()} if main else {}
    try:
        watch.detach()
        if getattr(sys, "last_value", None) is None:  # (no uncaught error: ending as it should)
            watch.mark_closed()
    finally:
        for s, h in previous.items():
            if h is not None:  # (None: a handler set outside Python, which cannot be put back)
                signal.signal(s, h)
