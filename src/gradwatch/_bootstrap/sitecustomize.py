"""Loaded at interpreter start-up in processes run by `gradwatch run` (this folder is put on
PYTHONPATH). It starts watching once the process imports torch, then hands over to any other
sitecustomize the environment had, so the user's own start-up code still runs."""

import os
import sys


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
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def _keep_the_lock_from_children():
    """The run directory's lock is held by `gradwatch run`'s command until it ends, but not by
    what it leaves running (`os.system("tensorboard ... &")`): such a process kept the run "still
    being written" and its directory refused to the next run, long after the command had ended.
    (A process forked from this one still holds it, and ends with it: DataLoader workers.)"""
    try:
        os.set_inheritable(int(os.environ["GRADWATCH_LOCK_FD"]), False)
    except (KeyError, ValueError, OSError):  # no lock passed, or closed by the command that ran us
        pass


if os.environ.get("GRADWATCH_RUN_DIR"):
    _keep_the_lock_from_children()
    _watch_when_torch_imports()
_chain_next_sitecustomize()
