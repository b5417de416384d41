"""Zero-code mode: watch whatever model trains in this process, found as it first runs.

Started by the bootstrap (`gradwatch run` sets GRADWATCH_RUN_DIR) once `torch` is imported.
Models are found by global module hooks during the first steps (a module called from outside any
other module's forward is a model); the step is defined by the first optimizer seen stepping,
or by each backward pass where there is none (weights updated by hand).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import warnings
import weakref

from torch import nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from gradwatch.collect import patches
from gradwatch.collect.distributed import process_rank
from gradwatch.collect.layers import has_lazy_params
from gradwatch.collect.watch import Watch
from gradwatch.errors import GradwatchError
from gradwatch.store.reader import STORE_NAME

ENV_RUN_DIR = "GRADWATCH_RUN_DIR"
ENV_OPTIONS = {"every": "GRADWATCH_EVERY", "sample_every": "GRADWATCH_SAMPLE_EVERY", "flush_every": "GRADWATCH_FLUSH_EVERY",
               "all_ranks": "GRADWATCH_ALL_RANKS"}
DISCOVERY_STEPS = 2  # global forward hooks cost time on every module call: keep them briefly


def _claim_store(run_dir: str) -> str:
    """This process's store file: rank-named under torchrun, else the run's main file if free."""
    rank = process_rank()
    if rank is not None:
        return os.path.join(run_dir, f"gradwatch-rank{rank}.sqlite")
    main = os.path.join(run_dir, STORE_NAME)
    try:
        os.close(os.open(main, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return main
    except FileExistsError:
        return os.path.join(run_dir, f"gradwatch-pid{os.getpid()}.sqlite")


class AutoWatch(Watch):
    """A Watch with no model given: it adopts models and the optimizer as they appear."""

    def __init__(self, run_dir: str, **options: int):
        super().__init__(None, None, out=None, meta={"command": sys.argv, "pid": os.getpid()}, **options)
        self._writer = None  # the store file is made at the first flush, so idle processes write nothing
        self.run_dir = run_dir
        self._depth = 0
        self._prefixes: set[str] = set()
        self._discovery = [
            register_module_forward_pre_hook(self._enter_module),
            register_module_forward_hook(self._leave_module),
        ]
        self._discover_until = DISCOVERY_STEPS
        self._other_steps: dict[int, int] = {}  # other optimizers' steps since the adopted one's last
        self._checked: weakref.WeakSet = weakref.WeakSet()  # optimizers whose parameters were looked at
        self._new_model: weakref.WeakSet = weakref.WeakSet()  # ... and found training a model not watched yet
        self._backwards_since_step = 0  # backward calls since the step's optimizer last stepped
        self._own_losses = False  # another optimizer steps after a backward of its own (said once)
        self._handles.append(register_optimizer_step_pre_hook(self._global_pre))
        self._handles.append(register_optimizer_step_post_hook(self._global_post))

    def flush(self) -> None:
        if self.store_path is None and (self._pending or self._events):
            from pathlib import Path

            self.store_path = Path(_claim_store(self.run_dir))
        super().flush()

    def _enter_module(self, module: nn.Module, args) -> None:
        if self._depth == 0 and id(module) not in self._seen_modules:
            self._discover(module)
        self._depth += 1

    def _discover(self, module: nn.Module) -> None:
        """A module run outside any watched one: a model to watch, unless it is torch's internals
        of one (a weight parametrization computed when the model is built: spectral_norm) or is
        not shaped yet (Lazy modules: found at a later step)."""
        if isinstance(module, ParametrizationList):
            return
        if has_lazy_params(module):
            self._discover_until = max(self._discover_until, self._step + DISCOVERY_STEPS)
            return
        inner = getattr(module, "_orig_mod", None)
        compiled = isinstance(inner, nn.Module) and type(module).__name__ == "OptimizedModule"
        if compiled:
            self._seen_modules.add(id(module))  # torch.compile's wrapper: the layers keep their own names
            module = inner
        name = type(module).__name__
        prefix = "" if not self._models else name
        while prefix in self._prefixes and prefix:
            prefix += "_"
        self._prefixes.add(prefix)
        try:
            self.add_model(module, prefix)
            if compiled:  # its first compile is about to happen: see _first_compile_without_hooks
                self._first_compile_without_hooks()
        except Exception as exc:  # never break the user's forward
            self._seen_modules.add(id(module))
            detail = str(exc) if isinstance(exc, GradwatchError) else f"{type(exc).__name__}: {exc}"
            print(f"gradwatch: not watching {name}: {detail}", file=sys.stderr)

    def _first_compile_without_hooks(self) -> None:
        """A compiled model's first call compiles it. With the sampled-step hooks on, the graph
        breaks at them and torch runs the whole forward eagerly from then on. Compiled without
        them, and told to check for them, it keeps its graph on every unsampled step; only the
        sampled ones run eagerly. Its first step's activation statistics are the price."""
        patches.compile_sees_hooks()
        self._disarm()

    def _leave_module(self, module: nn.Module, args, output) -> None:
        self._depth = max(self._depth - 1, 0)

    def _global_pre(self, optimizer, args, kwargs) -> None:
        if self._optimizer is None:
            self.adopt_optimizer(optimizer)
        elif optimizer is self._optimizer:
            self._other_steps.clear()
        elif not getattr(optimizer, "_gradwatch_inner", False):  # not a remedy trial's own Adam
            self._other_step(optimizer)
        self._before_step(optimizer)

    def after_backward(self, root: object) -> None:
        super().after_backward(root)
        self._backwards_since_step += 1

    def _other_step(self, optimizer) -> None:
        """An optimizer other than the step's steps. Alternating with it (a GAN's generator and
        discriminator), its update belongs to the step: the weights before the step are taken
        before the first update, so Δw has both. Stepping twice with no step of the adopted one
        between (a second training phase, a new model in a sweep), it becomes the step's optimizer.
        Parameters it trains that no watched model holds: models are discovered again."""
        n = self._other_steps[id(optimizer)] = self._other_steps.get(id(optimizer), 0) + 1
        if n == 1 and self._backwards_since_step and not self._own_losses:
            # a backward of its own since the step's optimizer stepped: it trains on another loss
            # (a GAN's generator), and the step's loss mixes the two objectives
            self._own_losses = True
            self._events.append((self._step, "own_loss", f"{type(optimizer).__name__} trains on a loss of its own"))
        if optimizer not in self._checked:
            self._checked.add(optimizer)
            if any(p.requires_grad and id(p) not in self._seen_params
                   for group in optimizer.param_groups for p in group["params"]):
                self._new_model.add(optimizer)
                self._rediscover()
        if n >= 2:
            self._other_steps.clear()
            # a model not watched before, trained instead of the last one: a new phase (an encoder
            # frozen after warm-up, its decoder's optimizer going on alone, is not)
            if optimizer in self._new_model and not _params_of(optimizer) & _params_of(self._optimizer):
                self._events.append((self._step, "new_phase", f"{type(optimizer).__name__} trains another model"))
            else:
                self._say_stopped(self._optimizer, optimizer)
            self.adopt_optimizer(optimizer)
        elif self._snapshot is None and self._params and (rec := self._current()) is not None and rec.sampled:
            self._take_snapshot(rec)  # (stepping right after the adopted one, it opens the next step)

    def _say_stopped(self, old, new) -> None:
        """The step's optimizer stopped stepping while another goes on (an encoder's warm-up
        optimizer): the layers only it trained stop changing on purpose, not for lack of an optimizer."""
        left = _params_of(old) - _params_of(new)
        names = [l.name for l in self._layers if l.params and all(id(p) in left for p in l.params)]
        if names:
            self._events.append((self._step, "optimizer_stopped", json.dumps(names)))

    def _rediscover(self) -> None:
        if not self._discovery:
            self._discovery = [register_module_forward_pre_hook(self._enter_module),
                               register_module_forward_hook(self._leave_module)]
        self._discover_until = self._step + DISCOVERY_STEPS

    def _global_post(self, optimizer, args, kwargs) -> None:
        if optimizer is self._optimizer:
            self._backwards_since_step = 0
        self._after_step(optimizer)

    def _end_step(self, count: bool = True) -> None:
        self._depth = 0  # a forward that raised never reached its post-hook
        super()._end_step(count)
        if self._step >= self._discover_until:
            self._stop_discovery()

    def _stop_discovery(self) -> None:
        for handle in self._discovery:
            handle.remove()
        self._discovery = []

    def detach(self) -> None:
        self._stop_discovery()
        super().detach()


def _params_of(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def start_from_env() -> AutoWatch | None:
    """Start zero-code watching if `gradwatch run` asked for it (idempotent)."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir or getattr(start_from_env, "watch", None) is not None:
        return None
    options = {k: int(os.environ[v]) for k, v in ENV_OPTIONS.items() if os.environ.get(v)}
    watch = AutoWatch(run_dir, **options)
    start_from_env.watch = watch
    atexit.register(watch.detach)
    # torch warns that a compiled model's wrapper fires global module hooks once more: those are
    # the discovery hooks of this watch, which take the wrapper's inner model (AutoWatch._discover)
    warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
    _flush_on_sigterm(watch)
    return watch


def _flush_on_sigterm(watch: AutoWatch) -> None:
    """SIGTERM (`kill`, a scheduler's time limit, `gradwatch run` passing one on) ends Python
    without atexit: store the steps since the last flush, then die of the signal as before. Only
    where the script has no handler of its own yet (one it installs later replaces this), and
    only in this process, not in a forked DataLoader worker that inherits it."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        return
    pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        if os.getpid() == pid:
            try:
                watch.detach()
            except Exception:  # dying anyway: what was flushed before stays
                pass
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
