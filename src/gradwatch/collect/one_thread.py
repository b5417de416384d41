"""The one thread whose training a process's zero-code watch follows.

Global hooks (module forward, optimizer step, backward) fire in every thread, but a watch records
one training: two models trained at once in two threads (a ThreadPoolExecutor) had their forwards,
backwards and steps mixed into one step record, and the exit flush failed with a traceback (3 of
80 steps stored). Threads that train one after another (a pool's jobs, a worker after the main
thread's warm-up) hand the watch over between steps; once two are seen training at once, it keeps
to the one it follows until that thread ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

HOLD = 5.0  # s another thread's training is held while the process dies of a signal (see `hold`)


class TrainingThread:
    """`busy()`: the followed thread is inside a step (between its first forward or backward and
    its optimizer step's end); `two_at_once(followed, other)`: called once, when two threads are
    seen training at once (from the other one). `stopped`: no thread's calls are followed."""

    def __init__(self, busy: Callable[[], bool], two_at_once: Callable[[threading.Thread, threading.Thread], None]):
        self.ident: int | None = None
        self.concurrent = False
        self.stopped = False
        self._holder: int | None = None
        self._busy = busy
        self._two_at_once = two_at_once

    def mine(self, claim: bool = True, proves: bool = True) -> bool:
        """This call's thread is the followed one. `claim`: a call that starts something (a forward,
        a backward, an optimizer step) takes the watch where no thread is followed or the followed
        one has ended; a backward or an optimizer step from another thread (`proves`) also where,
        until two threads were seen training at once, the followed one is between steps. A forward
        (not `proves`) never takes it from a live thread, nor proves two trainings: nn.DataParallel's
        replicas, a prefetching thread's transforms (nn.Modules, run with gradients on) train
        nothing there; taking the watch over between the script's steps, they lost 296 of its 300.
        (A handover from a thread that had run only forwards since it took the watch let a second
        concurrent training take it between the first's forward and backward: recording stopped,
        and once the second's step raised inside the script's opt.step().)"""
        ident = threading.get_ident()
        if self._holder not in (None, ident):
            time.sleep(HOLD)  # (the process dies meanwhile)
            return False
        if self.stopped:
            return False
        if ident == self.ident or self.ident is None:
            if claim:
                self.ident = ident
            return True
        if not claim:
            return False
        followed = _thread(self.ident)
        if followed is not None and not proves:
            return False  # a forward never takes a live thread's watch (a prefetching thread's transforms)
        if followed is None or (not self.concurrent and not self._busy()):
            self.ident = ident
            return True
        if proves and not self.concurrent:
            self.concurrent = True
            self._two_at_once(followed, threading.current_thread())
        return False

    def followed(self) -> bool:
        """This call's thread is the one followed (not merely: none is followed yet)."""
        return self.ident == threading.get_ident()

    def hold(self, ident: int | None = None) -> None:
        """The process dies of a signal, its last steps stored by thread `ident` (this one if None):
        training in any other thread stops at its next forward, backward or step, as it would have
        at the signal without gradwatch (it ran on while the steps were stored: 2 more steps taken,
        never stored)."""
        self._holder = threading.get_ident() if ident is None else ident


def _thread(ident: int) -> threading.Thread | None:
    """The live thread of id `ident`, if any."""
    return next((t for t in threading.enumerate() if t.ident == ident and t.is_alive()), None)
