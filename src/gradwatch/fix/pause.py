"""A trial that pauses at its budget instead of ending, so that `fix` can run it further later.

Screening runs every remedy for a few steps; the finals run a few of them for the whole budget.
A final that is one screened remedy alone has already run its first steps: paused, not ended, its
process goes on from there, and its steps before the pause are not paid for twice. The two talk
over a pair of pipes: the trial writes "paused K" after its K-th step, once its store holds them,
and blocks until fix answers with the step to run to next, or "stop" (the end of the pipe, when
fix dies, is a stop too: no trial outlives it). A process that cannot pause (not fix's own child:
a launcher's worker, a shell's command) ends at its budget, as before.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import threading
import time

from gradwatch.runner import is_the_command

ENV_PAUSE = "GRADWATCH_PAUSE"  # "<fd to read fix's answer>,<fd to tell fix>" in a trial that may pause
STOP = "stop"
POLL = 0.25  # seconds between two looks at whether a trial that has not paused has ended


class Channel:
    """fix's end of one trial's pipes."""

    def __init__(self) -> None:
        self._answer_r, self._answer_w = os.pipe()  # fix -> trial
        self._told_r, self._told_w = os.pipe()  # trial -> fix
        self._buffer = b""
        self.memory = 0  # bytes the trial held at its last pause (its peak resident size)

    def env(self) -> dict[str, str]:
        return {ENV_PAUSE: f"{self._answer_r},{self._told_w}"}

    @property
    def child_fds(self) -> tuple[int, int]:
        return self._answer_r, self._told_w

    def started(self) -> None:
        """The trial holds its ends now: fix's copies of them go, so that the trial's exit (and
        nothing else) ends the pipe fix reads."""
        for fd in self.child_fds:
            os.close(fd)

    def paused_at(self, proc: subprocess.Popen, seconds: float) -> int | None:
        """The step the trial paused at, waiting at most `seconds` (None: it has not paused, or
        has ended: `proc.poll()` tells which). A forked child of the trial (a DataLoader worker)
        holds the pipe open after the trial ends: its end is seen by polling, not by the pipe."""
        deadline = time.monotonic() + seconds
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                return None
            ready, _, _ = select.select([self._told_r], [], [], min(POLL, left))
            if ready:
                chunk = os.read(self._told_r, 64)
                if not chunk:  # every writer gone: it ended
                    proc.wait()
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        _, steps, memory = line.split()
        self.memory = int(memory)
        return int(steps)

    def go_on(self, to_step: int) -> None:
        """Run on to step `to_step` (then pause again)."""
        self._send(str(to_step))

    def stop(self) -> None:
        """End the trial as its budget would have, then close fix's ends."""
        self._send(STOP)
        self.close()

    def _send(self, line: str) -> None:
        try:
            os.write(self._answer_w, f"{line}\n".encode())
        except OSError:  # (it ended meanwhile: nothing to tell)
            pass

    def close(self) -> None:
        for fd in (self._answer_w, self._told_r):
            try:
                os.close(fd)
            except OSError:
                pass


def child_channel() -> tuple[int, int] | None:
    """In a trial: the pipe ends to pause on, when this process is the one fix started (the
    variable is inherited by a launcher's workers, where the numbers name other files or none)."""
    value = os.environ.get(ENV_PAUSE)
    if not value:
        return None
    try:
        read_fd, write_fd = (int(x) for x in value.split(","))
        if not is_the_command() or not all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (read_fd, write_fd)):
            return None
    except (ValueError, OSError):
        return None
    return read_fd, write_fd


def wait_for_more(channel: tuple[int, int], steps: int) -> int | None:
    """Say `steps` are done, and block until fix answers: the step to run to next, or None to end.
    Ctrl-C reaches fix and its trials alike; paused, a trial leaves it to fix, which ends it: a
    script's `except KeyboardInterrupt: save(...)` wrote its checkpoint after fix had put the user's
    directory back."""
    main = threading.current_thread() is threading.main_thread()
    held = signal.getsignal(signal.SIGINT) if main else None  # (None too: set outside Python, left alone)
    if held is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return _answer(channel, steps)
    finally:
        if held is not None:
            signal.signal(signal.SIGINT, held)


def _answer(channel: tuple[int, int], steps: int) -> int | None:
    read_fd, write_fd = channel
    try:
        os.write(write_fd, f"paused {steps} {peak_memory()}\n".encode())
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = os.read(read_fd, 64)
            if not chunk:  # fix has gone
                return None
            answer += chunk
    except OSError:
        return None
    text = answer.decode().strip()
    return None if text == STOP else int(text)


def peak_memory() -> int:
    """This process's peak resident size in bytes (getrusage says kilobytes on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def available_memory() -> float:
    """Bytes of memory free for new work (MemAvailable; the free pages where that is not known;
    0 where neither is: nothing is kept paused on an unknown budget)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0.0
