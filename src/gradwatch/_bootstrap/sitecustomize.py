"""Loaded at interpreter start-up in processes run by `gradwatch run` (this folder is put on
PYTHONPATH). It starts watching once the process imports torch (or, when a gradwatch module
imports torch, once that module is loaded: _watch_when_torch_imports); in the process `gradwatch run`
started itself, it installs the SIGTERM/SIGHUP handler that stores the last steps at start-up (from
the main thread, while it is still the only one). Then it hands over to any other sitecustomize the
environment had, so the user's own start-up code still runs (and `import sitecustomize` finds it)."""

import _thread
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
    """The watch starts once torch is loaded and no gradwatch module is being run: a script
    starting with `import gradwatch.fix` (or gradwatch.collect.watch) has torch imported by it, and
    the watch started at torch's load imported that module half-run (an ImportError, nothing
    recorded). Counted by wrapping the loaders of the gradwatch modules found until the start: no
    tracing (a profile function waiting for that module's return costs every call meanwhile, and
    contends with cProfile, coverage and debuggers), nothing more for a script that never imports
    gradwatch, and no user code runs meanwhile, so the watch sees what it sees when torch comes first."""
    if "torch" in sys.modules:
        _start()
        return
    import importlib.abc

    class ImportHook(importlib.abc.MetaPathFinder):
        gradwatch_bootstrap = True  # (another copy's hook, a nested run's from another install, is skipped)

        def find_spec(self, name, path, target=None):
            if name == "torch":
                return _wrapped(_spec_elsewhere(self, name, path, target), _then_watch)
            if _counts(name):
                return _wrapped(_spec_elsewhere(self, name, path, target), _counted)
            return None

    _hook.append(ImportHook())
    sys.meta_path.insert(0, _hook[0])


# The gradwatch modules the watch's start imports (`_start`): only their imports delay it. One of
# the others run in a thread meanwhile (the Lightning integration, which imports lightning for
# seconds) held the watch back while the main thread trained, its first steps lost.
STARTS = ("gradwatch", "gradwatch.runner", "gradwatch.errors", "gradwatch.say",
          # (`--status`: the watch's status line; one imported in a thread, the start met it half-run)
          "gradwatch.integrations", "gradwatch.integrations._rows", "gradwatch.integrations.terminal",
          "gradwatch.integrations.tensorboard")
STARTS_PACKAGES = ("gradwatch.collect", "gradwatch.fix", "gradwatch.remedies", "gradwatch.diagnose", "gradwatch.store")


def _counts(name):
    return name in STARTS or ".".join(name.split(".")[:2]) in STARTS_PACKAGES


def _spec_elsewhere(hook, name, path, target):
    """The spec the import system would find without `hook` (the next finders, in order; not
    another copy of this hook, which would ask this one back, without end)."""
    for finder in list(sys.meta_path):
        find = getattr(finder, "find_spec", None)
        if finder is hook or getattr(finder, "gradwatch_bootstrap", False) or find is None:
            continue
        if (spec := find(name, path, target)) is not None:
            return spec
    return None


def _wrapped(spec, around):
    """`spec`, its loader's exec_module run through `around(exec_module, module)` for this module
    only (a loader shared by modules, zipimport's, runs the others as before). Left as it is where
    the loader takes no attribute: the import itself must never fail because of gradwatch."""
    loader = getattr(spec, "loader", None)
    exec_module = getattr(loader, "exec_module", None)
    if exec_module is None:
        return spec

    previous = getattr(loader, "__dict__", {}).get("exec_module")  # (another module's wrapper, on a shared loader)

    def exec_module_then(module):
        try:
            if getattr(module, "__name__", None) == spec.name:
                around(exec_module, module)
            else:
                exec_module(module)
        finally:  # the loader as it was: seen by importlib.util.find_spec, pickle, the next import
            if loader.__dict__.get("exec_module") is exec_module_then:
                if previous is None:
                    del loader.exec_module
                else:
                    loader.exec_module = previous

    try:
        loader.exec_module = exec_module_then
    except (AttributeError, TypeError):
        pass
    return spec


_hook = []  # the import hook, until the watch starts
_running = []  # the gradwatch modules being run, in any thread (a thread's import counts too)
_torch_loaded = []  # [True] once it is
_lock = _thread.allocate_lock()


def _counted(exec_module, module):
    with _lock:
        _running.append(module)
    try:
        exec_module(module)
    finally:
        with _lock:
            _running.remove(module)
            ready = _ready()
        if ready:  # (also if this import failed: the script may carry on with torch)
            _start()


def _then_watch(exec_module, module):
    exec_module(module)
    with _lock:
        _torch_loaded.append(True)
        ready = _ready()
    if ready:
        _start()


def _ready():
    """True once (under _lock): torch is loaded and no gradwatch module is being run. The hook goes."""
    if _running or not _torch_loaded or not _hook:
        return False
    hook = _hook.pop()
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)
    return True


def _start():
    try:
        from gradwatch.collect.auto import start_from_env
        from gradwatch.runner import in_fix_trial

        injector = None
        if in_fix_trial():
            from gradwatch.fix.inject import start_from_env as start_remedy  # (0.2 s: not in every run)

            injector = start_remedy()  # changes the model before the watch sees it
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

    # (nor another gradwatch's, a nested run's from another install: each would chain the other)
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here
            and not os.path.abspath(p or ".").endswith(os.path.join("gradwatch", "_bootstrap"))]
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


ENV_WRITES = "GRADWATCH_FIX_WRITES"  # a fix trial's: the file its processes note what they write in (fix/touched.py)
WRITE_EVENTS = ("os.remove", "os.rename", "os.truncate", "os.mkdir", "shutil.rmtree", "sqlite3.connect",
                "gradwatch.wrote")  # their first argument a path (os.rename's second too)
_writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
SPAWNS = ("subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec")  # programs started


def _python(event, args):
    """The program started is Python, which loads this hook and notes its own writes. Popen's
    arguments are (executable or None, args, cwd, env); os.exec's and os.posix_spawn's (path, argv,
    env); a shell (os.system) and os.spawn* count as another program."""
    try:
        if event == "subprocess.Popen":
            program = args[0] if args[0] is not None else \
                (args[1] if isinstance(args[1], (str, bytes, os.PathLike)) else args[1][0])
        elif event in ("os.exec", "os.posix_spawn"):
            program = args[0]
        else:
            return False
        return os.path.basename(os.fsdecode(program)).split()[0].startswith("python")
    except (TypeError, ValueError, IndexError):
        return False


def _note_writes(log):
    """A fix trial: every path its Python code opens for writing, removes, renames or truncates
    (audit events, so any library that writes through Python: open, numpy, PIL, logging, sqlite3;
    torch.save, which opens in C++, says so itself: fix/inject.py) is appended to `log`, once
    each, so fix puts back what the trial wrote and no other program's file (a tester's notes,
    written beside a fix, were moved into its trials). A fork inherits the hook and the
    descriptor; a spawned process opens it again."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    seen = set()

    def hook(event, args):
        if event in SPAWNS and not _python(event, args):
            # a program of another kind writes what this hook cannot see (`cp ckpt.pt last.pt`): the
            # trial's changes can no longer be told from another program's, and are all taken for its own
            if "*" not in seen:
                seen.add("*")
                os.write(fd, b"*\n")
            return
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or not (mode and any(c in mode for c in "wax+") or not mode and flags & _writing):
                return
            paths = (path,)
        elif event in WRITE_EVENTS:
            paths = args[:2] if event == "os.rename" else args[:1]
            if event == "sqlite3.connect" and str(paths[0]).startswith((":memory:", "file:")):
                return
        else:
            return
        for path in paths:
            try:
                path = os.path.realpath(os.fsdecode(path))
            except (TypeError, ValueError, OSError):
                continue
            if path not in seen:
                seen.add(path)
                os.write(fd, (path + "\n").encode(errors="surrogateescape"))

    sys.addaudithook(hook)


if os.environ.get(ENV_WRITES):
    try:
        _note_writes(os.environ[ENV_WRITES])
    except OSError:  # (fix then puts back every file the trials changed, as before)
        pass
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
