"""Loaded at interpreter start-up in processes run by `gradwatch run` (this folder is put on
PYTHONPATH). It starts watching once the process imports torch; in the process `gradwatch run`
started itself, it installs the SIGTERM/SIGHUP handler that stores the last steps at start-up (from
the main thread, while it is still the only one). Then it hands over to any other sitecustomize the
environment had, so the user's own start-up code still runs (and `import sitecustomize` finds it)."""

import os
import signal
import sys

FLUSH_MARK = "_gradwatch_flush"  # on the signal handlers gradwatch installs (as collect/exit_signals.py names it)
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
ENV_RUNNER_PID = "GRADWATCH_RUNNER_PID"  # `gradwatch run`'s own pid (runner.child_env)
EXIT_SIGNALS = "gradwatch.collect.exit_signals"  # the handling, once a watch may exist (read from sys.modules)
_getsignal, _setsignal = signal.getsignal, signal.signal  # the real ones: see _report_ours_as_default
_stand_in = {}  # signal -> gradwatch's handler, where it was installed in this process (for SIG_DFL)


def _watch_when_torch_imports():
    if "torch" in sys.modules:
        _start()
        return
    import importlib.abc
    import importlib.machinery

    class TorchImportHook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_watch(module):
                exec_module(module)
                _start()

            spec.loader.exec_module = exec_then_watch
            return spec

    sys.meta_path.insert(0, TorchImportHook())


def _start():
    try:
        from gradwatch.collect.auto import start_from_env
        from gradwatch.fix.inject import start_from_env as start_remedy

        injector = start_remedy()  # `gradwatch fix` trials: changes the model before the watch sees it
        start_from_env(number_resumed=injector is None)  # (a trial's steps count from 0: its budget does)
        if injector is not None:
            injector.install_late()
    except Exception as exc:  # never break the user's program
        if sys.stderr is not None:  # (closed: print would write into the script's stdout)
            print(f"gradwatch: not watching this process ({type(exc).__name__}: {exc})", file=sys.stderr)


def _chain_next_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    import importlib.machinery
    import importlib.util

    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        ours = sys.modules.get("sitecustomize")
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module  # the script's `import sitecustomize` finds its own
        try:
            spec.loader.exec_module(module)
        except BaseException:  # (site.py says "Error in sitecustomize", as without gradwatch)
            sys.modules["sitecustomize"] = ours
            raise


def _keep_the_lock_from_children():
    """The run directory's lock is held by `gradwatch run`'s command until it ends, but not by
    what it leaves running (`os.system("tensorboard ... &")`): such a process kept the run "still
    being written" and its directory refused to the next run, long after the command had ended.
    (A process forked from this one still holds it, and ends with it: DataLoader workers.)"""
    try:
        os.set_inheritable(int(os.environ["GRADWATCH_LOCK_FD"]), False)
    except (KeyError, ValueError, OSError):  # no lock passed, or closed by the command that ran us
        pass


def _on_signal(signum, frame):
    """SIGTERM, SIGHUP: store the steps since the last flush, then die of the signal (see
    collect/exit_signals.py). Installed here, at start-up, in the main thread (of the command `gradwatch
    run` started: elsewhere at torch's import), the only one Python lets install a handler: torch
    imported in another thread (training run from a server's or a GUI's worker thread) found none
    installed, and lost those steps. Until a watch exists, it ends the process as the default would."""
    handling = sys.modules.get(EXIT_SIGNALS)
    if handling is not None:
        handling.on_signal(signum)
    else:
        _setsignal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _started_by_the_runner():
    """This process is the command `gradwatch run` started (not a helper it runs in turn): a
    Python handler waits for the main thread to run Python, so a helper busy in a long C call
    (no torch, nothing to store) ignored `terminate()` until the call returned (9.3 s, not 0.0 s).
    (runner.is_the_command, which imports too much for every process's start-up.)"""
    return os.environ.get(ENV_RUNNER_PID) == str(os.getppid())


def _report_ours_as_default():
    """`signal.getsignal` and the handler `signal.signal` returns say SIG_DFL where gradwatch's
    handler is: scripts see what they would see without gradwatch. A script's handler that passes
    the signal on to the one it found (`prev()` if callable, else the default action) called
    gradwatch's, which cannot tell that call from its own and swallowed the SIGTERM (the script
    ran on); Lightning's `_has_already_handler` took it for the user's and installed none. The
    script's handler now replaces ours; if it exits (sys.exit), atexit stores the steps. The
    default it sets where gradwatch's handler stands in (_stand_in) is that handler again: the
    steps are stored when it then sends itself the signal, or when a handler it set aside for a
    while (`old = signal.signal(SIGTERM, SIG_IGN)` around a checkpoint's save) is put back."""
    import functools

    @functools.wraps(_getsignal)
    def getsignal(signalnum):
        return _as_seen(signalnum, _getsignal(signalnum))

    @functools.wraps(_setsignal)
    def set_signal(signalnum, handler):
        if isinstance(handler, int) and handler == signal.SIG_DFL:
            handler = _stand_in.get(signalnum, handler)
        return _as_seen(signalnum, _setsignal(signalnum, handler))

    set_signal.stand_in = _stand_in  # (collect/exit_signals.py adds the handler it installs)
    signal.getsignal, signal.signal = getsignal, set_signal


def _as_seen(signum, handler):
    return signal.SIG_DFL if signum in SIGNALS and getattr(handler, FLUSH_MARK, False) else handler


def _flush_on_signals():
    """Only where the script's environment left the default (a job started with nohup keeps SIGHUP
    ignored); a handler the script installs replaces this one."""
    setattr(_on_signal, FLUSH_MARK, True)
    for signum in SIGNALS:
        if _getsignal(signum) is signal.SIG_DFL:
            _setsignal(signum, _on_signal)
            _stand_in[signum] = _on_signal


def _default_in_forked_child():
    """In every forked child, gradwatch's handlers (this hook's, and those collect/exit_signals.py
    installs) go back to the default: a Python handler runs only when the main thread runs Python,
    and a fork Pool's worker blocked in C at `Pool.__exit__`'s SIGTERM never died (the pool's join
    hung). The default the child sets is the default too (no stand-in)."""
    _stand_in.clear()
    _swap_ours(signal.SIG_DFL)


def _swap_ours(handler):
    """Set each signal whose handler is gradwatch's to `handler`, with the signals blocked
    meanwhile: one arriving between the two would be dropped by Python ("ignored due to race
    condition"). Returns the handlers replaced: none outside the main thread (Python refuses there)."""
    ours = {s: h for s in SIGNALS if getattr(h := _getsignal(s), FLUSH_MARK, False)}
    try:
        _set_blocked({s: handler for s in ours})
    except ValueError:
        return {}
    return ours


def _set_blocked(handlers):
    held = signal.pthread_sigmask(signal.SIG_BLOCK, set(handlers))
    try:
        for signum, handler in handlers.items():
            _setsignal(signum, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _die_by_default_while_idle():
    """In a process multiprocessing spawned: a Pool ends its workers with SIGTERM while they wait
    for their next task in SimpleQueue.get, blocked in C. A SIGTERM that landed just before that
    wait (or in another thread) was taken by the C handler, but the Python one never ran: the
    worker never died and the pool's join hung (1 run in 28 of a spawn Pool sweep under load).
    Before waiting there, the worker stores its steps (collect/exit_signals.py) and the signals kill by
    default; the handlers are back when the wait ends."""
    import functools
    from multiprocessing.queues import SimpleQueue

    wait = SimpleQueue.get

    @functools.wraps(wait)
    def get(self):
        handling = sys.modules.get(EXIT_SIGNALS)
        if handling is not None and not handling.flush_before_waiting():
            return wait(self)  # (mid-step: its steps cannot be stored yet; the handler stays)
        ours = _swap_ours(signal.SIG_DFL)
        try:
            return wait(self)
        finally:
            _set_blocked({s: h for s, h in ours.items() if _getsignal(s) is signal.SIG_DFL})

    SimpleQueue.get = get


if os.environ.get("GRADWATCH_RUN_DIR"):
    _keep_the_lock_from_children()
    _report_ours_as_default()
    if _started_by_the_runner():
        _flush_on_signals()
    os.register_at_fork(after_in_child=_default_in_forked_child)
    if "--multiprocessing-fork" in getattr(sys, "argv", ()):  # (spawn's command line for its processes)
        _die_by_default_while_idle()
    _watch_when_torch_imports()
_chain_next_sitecustomize()
