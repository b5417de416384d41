"""Zero-code mode: watch whatever model trains in this process, found as it first runs.

Started by the bootstrap (`gradwatch run` sets GRADWATCH_RUN_DIR) once `torch` is imported.
Models are found by global module hooks during the first steps (a module called from outside any
other module's forward is a model); the step is defined by the first optimizer seen stepping,
or by each backward pass where there is none (weights updated by hand).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import os
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from gradwatch.collect import exit_signals
from gradwatch.collect.caller_names import caller_name, held_modules
from gradwatch.collect.distributed import process_rank
from gradwatch.collect.exit_signals import store_last_steps
from gradwatch.collect.layers import compiled_inner, has_lazy_params
from gradwatch.collect.one_thread import TrainingThread, Unfollowed, unfollowed
from gradwatch.collect.patches import UNSCALED
from gradwatch.collect.sampled_hooks import quiet_global_hook_warning
from gradwatch.collect.watch import Watch, params_of
from gradwatch.errors import GradwatchError
from gradwatch.say import say as _say
from gradwatch.runner import ENV_OPTIONS, ENV_RUN_DIR, FORKED_MARK, WATCHED_MARK, is_the_command
from gradwatch.store.reader import STORE_NAME

DISCOVERY_STEPS = 2  # global forward hooks cost time on every module call: keep them briefly
# ... but on, up to this many steps, while an optimizer's model has not run with gradients: a WGAN's
# generator runs under no_grad for its critic's 5 steps first, and was never found
AWAIT_STEPS = 100


def _claim_store(run_dir: str) -> str:
    """This process's store file: rank-named under torchrun, else the run's main file if free. A
    worker started by multiprocessing (spawn) takes one named by its pid: the main file is the
    script's own, also before the script's first flush (a worker flushing first took it, and the
    script's training was summarised as "another process")."""
    rank = process_rank()
    if rank is not None:
        return os.path.join(run_dir, f"gradwatch-rank{rank}.sqlite")
    main = os.path.join(run_dir, STORE_NAME)
    if multiprocessing.parent_process() is None and _created(main):
        return main
    # a process that re-executes itself keeps its pid: each stage after the first one's own file
    # (a second os.execv's stage overwrote the first's, 7 steps lost)
    base = os.path.join(run_dir, f"gradwatch-pid{os.getpid()}")
    stage = 1
    while not _created(path := f"{base}.sqlite" if stage == 1 else f"{base}-{stage}.sqlite"):
        stage += 1
    return path


def _created(path: str) -> bool:
    """`path` made now, empty, by this process (False: it exists)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # a file, not a program
        return True
    except FileExistsError:
        return False


class AutoWatch(Watch):
    """A Watch with no model given: it adopts models and the optimizer as they appear.

    `number_resumed`: a training resumed from a checkpoint numbers its steps on from its
    optimizer's count (`gradwatch run`); off, they count from 0 in this process, as `gradwatch
    fix`'s trials need (their budget, and the step their locating run checks, count so)."""

    def __init__(self, run_dir: str, number_resumed: bool = False, **options: int):
        # no live status line unless asked (`gradwatch run --status`): the terminal is the script's,
        # and the line, drawn over its own progress bar (tqdm's \r on stderr), left pieces of both
        options["status"] = bool(options.get("status", False))
        # with stderr closed (`2>&-`) a finding's line would go to stdout, into the script's output
        options["warn"] = options.get("warn", True) and sys.stderr is not None
        super().__init__(None, None, out=None, meta={"command": sys.argv, "pid": os.getpid()}, **options)
        if self._live is not None:  # `gradwatch run` prints the whole run's findings when it ends
            self._live.check_at_close = False
        self._writer = None  # the store file is made at the first step or flush, so idle processes write nothing
        self.run_dir = run_dir
        self.pid = os.getpid()  # a forked child has a copy of this watch, and must not write (own_watch)
        self.the_command = is_the_command()  # `gradwatch run`'s own child: its steps take the main store
        self.number_resumed = number_resumed
        self._depth = 0
        self._prefixes: set[str] = set()
        self._discovery = [
            register_module_forward_pre_hook(self._enter_module),
            register_module_forward_hook(self._leave_module),
        ]
        self._discover_until = DISCOVERY_STEPS
        self._awaited: weakref.WeakSet = weakref.WeakSet()  # optimizers whose model is not found yet
        self._await_until = 0
        # other optimizers' steps since the adopted one's last: how many, and the step of the first
        self._other_steps: dict[int, tuple[int, int]] = {}
        self._checked: weakref.WeakSet = weakref.WeakSet()  # optimizers whose parameters were looked at
        # ... and found training a model not watched yet (at their first step, or made for one in training)
        self._new_model: weakref.WeakSet = weakref.WeakSet()
        self._own_loss: str | None = None  # another optimizer that stepped after a backward of its own
        self._own_losses = False  # ... with the adopted one stepping on after it (said once)
        self._ending = None  # an optimizer whose first step ends the step: see _other_step
        self._busy = 0  # flushes or detaches under way: a SIGTERM waits for their end
        self._deferred_signal: int | None = None
        self._updated = False  # a weight was seen changing (weights updated by hand: see _drop_untrained)
        self._untrained = 0  # steps dropped as training nothing
        self._loaded: weakref.WeakSet = weakref.WeakSet()  # optimizers given a saved state (load_state_dict)
        self.step_thread: int | None = None  # the thread the steps end in (see exit_signals.on_signal)
        self.flush_requested: threading.Event | None = None  # by a signal, from the main thread
        self._in_backward = False  # the followed thread is inside a backward call
        self._index: dict[int, int] = {}  # id(watched parameter) -> its index (see _fused_step)
        self._thread = TrainingThread(self._two_threads, self._handed_over, lambda: self._in_backward or self._in_step,
                                      lambda: self._depth > 0)
        self._thread.foreign = self._foreign  # (the hooks' set: another thread's calls are ignored)
        self._backward_seen = False  # (see _say_forwards_only)
        self._unfollowed: dict[int, Unfollowed] = {}  # thread ident -> what it did, not followed (one_thread)
        self._found_here: list[nn.Module] = []  # models found since the followed thread took the watch, not stored
        self._layers_at_take: set[int] = set()  # ids of the layers watched when it took it
        self._handles.append(register_optimizer_step_pre_hook(self._global_pre))
        self._handles.append(register_optimizer_step_post_hook(self._global_post))

    def flush(self) -> None:
        with self._uninterrupted():
            self._drop_untrained()
            if self._pending or self._events:
                self._claim_store()
                self._found_here = []  # (their layers are in the store now: never forgotten, see _forget_found)
            super().flush()

    def _claim_store(self) -> None:
        """The store file, taken at the first optimizer step (else at the first flush), and by the
        command `gradwatch run` started at its first step of any kind: taken at the first flush, a
        script's evaluation or fine-tuning run with subprocess before it (20 steps, flushed every
        50) took the run's main store, and the training (by hand, no optimizer) was "another process"."""
        if self.store_path is None:
            self.store_path = Path(_claim_store(self.run_dir))

    def _drop_untrained(self) -> None:
        """Backward passes with no optimizer that change no weight (saliency maps, input gradients,
        an evaluation that calls backward) train nothing: their steps are dropped. Recorded, they
        read as weights stuck since step 0 (`stalled_layers`: "give the optimizer every parameter").
        A loop that updates by hand shows its first Δw at its first sampled step, and from then on
        every step is kept."""
        if self._mode == "optimizer" or self._updated or self._dist is not None:
            return
        ready = [r for r in self._pending if r is not self._window.rec]
        measured = [r.delta for r in ready if r.delta is not None]
        if any(bool(delta.any()) for delta in measured):
            self._updated = True
        elif measured:
            self._untrained += len(ready)
            self._pending = [r for r in self._pending if r is self._window.rec]

    @contextlib.contextmanager
    def _uninterrupted(self) -> Iterator[None]:
        """A SIGTERM arriving while the store is written waits for the write's end (see
        exit_signals): a multiprocessing Pool sends one to each worker as it exits, which
        cut the worker's exit flush short and left its store empty."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy and self._deferred_signal is not None:
                signum, self._deferred_signal = self._deferred_signal, None
                os.kill(os.getpid(), signum)  # again, to the handler (in the main thread)

    def _two_threads(self, followed: threading.Thread, other: threading.Thread) -> None:
        """Two threads train at once: the followed one's training is recorded, the other's calls
        are ignored (see one_thread), and the script is told."""
        _say(f"gradwatch: threads {followed.name} and {other.name} train at once; zero-code watching records one "
             f"training per process: {followed.name}'s (then {other.name}'s, if it goes on after {followed.name} "
             "ends). To record each, train them one after another, or in processes of their own")

    def _handed_over(self, untrained: bool, at: str) -> None:
        """The watch passed to this thread: the last one's open module calls are not its, nor
        its backwards no optimizer step used (a try of the model: stored as a step of their own,
        with the new thread's first updates as theirs, and one step of the training missing).
        From a thread that never trained (`untrained`), the models it found go unless this thread
        ran them (`_forget_found`). What this thread did meanwhile is taken up: the optimizers it
        made, and at its backward or step (`at`) the models its forwards ran (`_find_ran`), at its
        step its backward (`_replay`)."""
        self._depth, self._in_backward = 0, False
        if self._backward_since_step:
            self._window.drop()
            self._cur, self._backward_since_step = None, False
            self._clear_grad_buffers()
        did = self._unfollowed.pop(threading.get_ident(), None)
        if did is None or did.thread is not threading.current_thread():  # (an ended thread's, its ident reused)
            did = Unfollowed()
        if untrained:
            self._forget_found(did.inside)
        self._found_here, self._layers_at_take = [], {id(layer) for layer in self._layers}
        for ref in did.optimizers:
            if (optimizer := ref()) is not None:
                self.params_added(optimizer)
        if at != "forward":
            self._find_ran(did)
        if at == "step" and did.root is not None:
            self._replay(did.root)

    def _replay(self, root: torch.Tensor) -> None:
        """The watch taken at this thread's step, its backward refused before (another thread had
        it): that backward, recorded now, its loss (NaN at step 0 before). Not its gradients: read
        at the step, they are what the script made of them since (clipped by clip_grad_norm_: a
        false 10x drop), and their norms at the backward's end were not taken (the thread was not
        followed), so they stay unmeasured, as its ∂L/∂output. A step fused into that backward,
        which runs on (an optimizer stepping in its gradient hooks), has it begin here; its end
        ends it."""
        self.before_backward(root)
        if torch._C._current_graph_task_id() != -1:
            return
        self._grads_seen += sum(p.grad is not None for p in self._params)  # (it reached them: its loss is the step's)
        self.after_backward(root)

    def _forget_found(self, ran: weakref.WeakSet) -> None:
        """The models the last thread found, and never trained, that this one did not run (`ran`:
        the modules its forwards ran): a teacher's or a reference net's, run with
        gradients on before the training started in this thread. Kept, they were stored as
        layers with no data, and took the plain names, the trained model's prefixed (`model.0`).
        Not once stored (see flush), nor a model holding layers found before (a piece of it)."""
        def dropped(model: nn.Module) -> bool:
            inside = {id(m) for m in model.modules()}
            return (any(model is m for m, _ in self._models) and model not in ran  # (a backbone it shares ran: kept)
                    and not any(id(l) in self._layers_at_take for l in self._layers if id(l.module) in inside))
        gone = [m for m in self._found_here if dropped(m)]
        self._cur = None  # (its forwards' statistics, not the training's)
        self._window.drop()
        if gone and self._dist is None:
            self._prefixes -= {prefix for m, prefix in self._models if any(m is x for x in gone)}
            self._forget_models(gone)

    def _find_ran(self, did: Unfollowed) -> None:
        """The models this thread ran before it took the watch at its backward or step: their
        forwards, not followed, found none, and this step went unrecorded (its loss and gradients:
        NaN at step 0). Found now, each named as its script called it at that forward (at the
        backward, a loop over an ensemble names the last); their layers are numbered by their next forward."""
        for ref in did.models:
            model = ref()
            if model is not None and id(model) not in self._seen_modules:
                self._discover(model, called=did.called.get(model))
                self._unordered = self._step

    def before_backward(self, root: object) -> None:
        self._backward_seen = True  # (in any thread: no training by torch.func, see _say_forwards_only)
        if self._thread.mine(starts=True):  # (another thread's training: see one_thread)
            self._in_backward = True
            super().before_backward(root)
        elif isinstance(root, torch.Tensor):  # (replayed if this thread takes the watch at its step)
            unfollowed(self._unfollowed).root = _for_replay(root)

    def after_backward(self, root: object) -> None:
        if self._thread.mine(claim=False):
            self._in_backward = False
            super().after_backward(root)

    def after_scaler_update(self) -> None:
        if self._thread.mine(claim=False):
            super().after_scaler_update()

    def guard_skipped(self, optimizer: torch.optim.Optimizer) -> None:
        if self._thread.mine(claim=False):
            super().guard_skipped(optimizer)

    def _one_thread(self, claim: bool) -> bool:
        """A module call is the followed thread's (one_thread). Not asked while torch.compile traces
        the call (its modules, inlined): the thread id would break the graph there, and the broken
        code ran on every later step (the hooks are not guarded on)."""
        return torch.compiler.is_compiling() or self._thread.mine(claim, proves=False)

    def _enter_module(self, module: nn.Module, args) -> tuple | None:
        if self._trains_nothing_here(module):
            return None
        if not self._one_thread(claim=torch.is_grad_enabled()):  # (without gradients: claims nothing)
            if torch.is_grad_enabled():  # (found if this thread takes the watch at its backward or step)
                unfollowed(self._unfollowed).ran(module, lambda: caller_name(module))
            return None
        # a model run with gradients off trains nothing (a mean teacher's or EMA copy's forward, a
        # frozen feature extractor's, an evaluation before training): found first, it took the
        # plain names and the model that trains was prefixed; it is found if it runs with them on
        replaced = None
        if self._depth == 0 and id(module) not in self._seen_modules and torch.is_grad_enabled():
            self._discover(module)
            replaced = self._sampled_hooks.run_pre_hook(module, args)
        self._depth += 1
        return replaced

    def _trains_nothing_here(self, module: nn.Module) -> bool:
        """A call from outside any module, in a thread not followed yet, of a module with no trainable
        parameter or without gradients: it neither claims the watch nor is found as a model. A
        prefetching thread's transforms (nn.Modules: torchvision's v2), run before the script's first
        forward, took the watch, and their thread's count of nested calls hid the model's forward."""
        if self._depth or torch.compiler.is_compiling() or self._thread.followed():
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))

    def _discover(self, module: nn.Module, called: str | None = None) -> None:
        """A module run outside any watched one: a model to watch, unless it is torch's internals
        of one (a weight parametrization computed when the model is built: spectral_norm) or is
        not shaped yet (Lazy modules: found at a later step)."""
        if isinstance(module, ParametrizationList):
            return
        if has_lazy_params(module):
            self._discover_until = max(self._discover_until, self._step + DISCOVERY_STEPS)
            return
        inner = compiled_inner(module)
        wrapper = module if inner is not None else None
        if wrapper is not None:
            self._seen_modules.add(id(wrapper))  # torch.compile's wrapper: the layers keep their own names
            self._sampled_hooks.add_compiled(wrapper)
            module = inner
        name = type(module).__name__
        pieces = self._pieces_of(module)
        for piece in pieces:
            self._models.remove(piece)
            self._prefixes.discard(piece[1])
        # the first model's layers keep their own names; a later one's are prefixed by the name
        # the script calls it by (`D`, `cls_head`), else by its type
        prefix = "" if not self._models or any(p == "" for _, p in pieces) else called or caller_name(module) or name
        # (a bare layer run as the first model is named by its type: the next one of that type is not)
        while prefix and (prefix in self._prefixes or any(l.name == prefix for l in self._layers)):
            prefix += "_"
        self._prefixes.add(prefix)
        inside = {id(m) for piece, _ in pieces for m in piece.modules()}
        try:
            self._add_model(module, prefix, taken=[l for l in self._layers if id(l.module) in inside])
            self._found_here.append(module)
            if wrapper is not None:
                self._sampled_hooks.entered(wrapper)
        except Exception as exc:  # never break the user's forward
            self._seen_modules.add(id(module))
            detail = str(exc) if isinstance(exc, GradwatchError) else f"{type(exc).__name__}: {exc}"
            _say(f"gradwatch: not watching {name}: {detail}")

    def _name_by_container(self, optimizer: torch.optim.Optimizer) -> None:
        """At the first step, before anything is stored: when every model found so far is a piece
        of one module the script holds but never calls, and that module is what the optimizer
        trains (every trainable weight of it), it is the model: its layers take its names. A loop
        calling model.encoder and model.decoder named the encoder's layers `0`, `2` (the first model
        keeps its own names) and the decoder's `decoder.0`, and advice pasted as `model[0]` named
        no layer of the model; now `encoder.0`, `decoder.0`."""
        if self._writer is not None or not self._models:
            return
        models, trained = [m for m, _ in self._models], params_of(optimizer)
        best, size = None, 0
        for m in held_modules():
            inside = {id(x) for x in m.modules()}
            if id(m) in self._seen_modules or any(m is x for x in models) or not all(id(x) in inside for x in models):
                continue  # (seen: a model's own, or its torch.compile / DDP wrapper)
            if all(id(p) in trained for p in m.parameters() if p.requires_grad) and (best is None or len(inside) < size):
                best, size = m, len(inside)
        if best is not None:
            self._discover(best)

    def _pieces_of(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """Models found before `model` that are pieces of it, run on their own before it (its
        layers called one by one, a slice `model[:2]` that holds some of its layers): their layers
        are its layers, named as such while none is stored yet. A model with a module of its own
        outside `model` (a pretrained net whose frozen backbone the next one shares) is no piece."""
        if self._writer is not None:
            return []
        inside = {id(m) for m in model.modules()}

        def piece(m: nn.Module) -> bool:
            if id(m) in inside:
                return True
            children = list(m.children())  # a slice: a container of its modules, with no weight of its own
            return bool(children) and not m._parameters and all(id(c) in inside for c in children)
        return [(m, p) for m, p in self._models if piece(m)]

    def _leave_module(self, module: nn.Module, args, output) -> None:
        if not self._one_thread(claim=False):
            return
        self._depth = max(self._depth - 1, 0)

    def _backward_running(self) -> bool:
        """Inside the followed thread's backward now: a backward that raised (a gradient check the
        script catches, an out-of-memory batch it skips) never reached after_backward, and the next
        step was taken for one fused into backward (11 of 12 stored, each a step off)."""
        if self._in_backward and torch._C._current_graph_task_id() == -1:
            self._in_backward = False
        return self._in_backward

    def _global_pre(self, optimizer, args, kwargs) -> None:
        if not self._thread.mine():
            if (did := self._unfollowed.get(threading.get_ident())) is not None:
                did.root = None  # (its gradients are used)
            return
        if self._backward_running():
            self._fused_step(optimizer)
            return
        if self._optimizer is None:
            self._name_by_container(optimizer)
            self._number_from_checkpoint(optimizer)
            self.adopt_optimizer(optimizer)
            self._claim_store()
        elif optimizer is self._optimizer:
            self._other_steps.clear()
            if self._own_loss is not None and not self._own_losses:
                # another optimizer stepped after a backward of its own, and this one goes on (a
                # GAN's generator and discriminator): the step's loss mixes two objectives
                self._own_losses = True
                self._events.append((self._step, "own_loss", f"{self._own_loss} trains on a loss of its own"))
        elif not getattr(optimizer, "_gradwatch_inner", False):  # not a remedy trial's own Adam
            self._other_step(optimizer)
        self._before_step(optimizer)

    def _fused_step(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer stepping inside the backward, fused into it (torch's recipe: a gradient hook
        per parameter calls opt.step() and clears p.grad). Adopted as the step's optimizer, each of
        them ended the step inside the backward and none of its gradients was stored. Each backward
        is a step instead (its update inside it: Watch._open_backward_window), and the optimizer's
        gradients are read here, before its step clears them: the script's hooks, registered before
        the model's first forward, run before the watch's own. Beside an optimizer stepping after
        the backward (some layers updated in it, the others after it) that one is the step's, and
        this one is no other optimizer taking over (`_other_step`): its gradients are read all the
        same (they read 0, and the cleared gradients' warning was not given)."""
        self._seen_stepping(optimizer)
        if self._optimizer is not None:
            self._open_window_in_backward()
        elif self._mode != "backward":
            self._mode = "backward"
            self._window.drop()  # (this step's update has begun: no ratio rather than a part of one)
        for group in optimizer.param_groups:
            for p in group["params"]:
                i = self._index_of(p)
                if i is not None and p.grad is not None and i in self._grad_fns:
                    self._read_early.add(i)
                    self._grad_fns[i](p)

    def _open_window_in_backward(self) -> None:
        """The step's update begins inside its backward (see `_fused_step`): the last step's window
        ends and this one's opens here. Opened at the step's optimizer, the in-backward updates
        fell into the next step's window, and the last one into none (a ratio of 0)."""
        self._window.settle(kept=True)
        self._take_window(self._current())

    def _index_of(self, p: torch.Tensor) -> int | None:
        """`p`'s index among the watched parameters (a dict, made again when they changed)."""
        i = self._index.get(id(p))
        if len(self._index) != len(self._params) or i is not None and self._params[i] is not p:
            self._index = {id(q): j for j, q in enumerate(self._params)}
            i = self._index.get(id(p))
        return i

    def params_added(self, optimizer) -> None:
        """An optimizer made for parameters no watched model holds: their model runs next, and is
        found at its first forward. Made once training is under way (the next phase's optimizer,
        for a model built after the first one trained), it trains a new model; made before (a GAN's
        second optimizer), it is the step optimizer's partner. Those of a watched model, frozen
        when it was found and unfrozen since, are its layers (Watch.params_added)."""
        if not self._thread.mine(claim=False, proves=False, takes=True):  # (made in a thread not followed: see one_thread)
            unfollowed(self._unfollowed).made(optimizer)  # (taken up if this thread takes the watch)
            return
        super().params_added(optimizer)
        if len(optimizer.param_groups) == 1:  # made now (its constructor adds the first group)
            self._handles.append(optimizer.register_load_state_dict_post_hook(self._state_loaded))
        if self._holds_unwatched(optimizer.param_groups[-1]["params"]):
            self._rediscover(optimizer)
            if self._optimizer is not None:
                self._new_model.add(optimizer)

    def _state_loaded(self, optimizer: torch.optim.Optimizer) -> None:
        """A saved state was loaded into `optimizer`: a resume, unless Accelerate's `prepare` loaded
        the optimizer's own state back to move it to the device (a fresh run was told it resumed
        from a checkpoint). An empty state may still be a checkpoint's: plain SGD keeps none."""
        frame = sys._getframe(1)
        while frame is not None:  # (only AcceleratedOptimizer's own: accelerator.load_state is a resume)
            if frame.f_code.co_name == "__init__" and frame.f_globals.get("__name__") == "accelerate.optimizer":
                return
            frame = frame.f_back
        self._loaded.add(optimizer)

    def _number_from_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        """At the first optimizer step: a training resumed from a checkpoint goes on from the steps
        its optimizer's loaded state has taken (Adam's per-parameter `step`), so two runs of it line
        up and "since step N" is the training's step; the store says so (meta `resumed`). An
        optimizer that keeps no count (SGD) was given a saved state: the steps stay numbered from
        0, and the store says the count is unknown (`_state_loaded`). (Only what this process has
        not recorded yet.)"""
        if not self.number_resumed or self.store_path is not None or self._step != 0:  # (a writer needs a path)
            return
        taken = steps_taken(optimizer)
        if taken is None and optimizer not in self._loaded or taken == 0:
            return
        self._meta["resumed"] = {"at_step": taken, "optimizer": type(optimizer).__name__}
        if taken:
            self.first_step = self._step = taken  # (from step 0)
            self._discover_until += taken
            for rec in {id(r): r for r in (*self._pending, self._cur) if r is not None}.values():
                rec.step += taken
            self._events = [(step + taken, kind, detail) for step, kind, detail in self._events]

    def _holds_unwatched(self, params) -> bool:
        """Some of `params` train and belong to no watched model: their model is not watched yet."""
        params = [p for p in params if p.requires_grad and id(p) not in self._seen_params]
        if not params:
            return False
        held = self._held_params()  # (a frozen layer unfrozen)
        return any(id(p) not in held for p in params)

    def _other_step(self, optimizer) -> None:
        """An optimizer other than the step's steps. Alternating with it (a GAN's generator and
        discriminator), its update belongs to the step: the weights before the step are taken
        before the first update, so Δw has both. Stepping twice with no step of the adopted one
        between (a second training phase, a new model in a sweep), it becomes the step's optimizer.
        Parameters it trains that no watched model holds: models are discovered again."""
        count, since = self._other_steps.get(id(optimizer), (0, self._step))
        n = count + 1
        self._other_steps[id(optimizer)] = (n, since)
        own = self._backward_since_step  # it steps on a loss of its own (no optimizer stepped since)
        first = optimizer not in self._checked
        if first:
            self._checked.add(optimizer)
            if self._holds_unwatched(p for group in optimizer.param_groups for p in group["params"]):
                self._new_model.add(optimizer)
                self._rediscover(optimizer)
        if n >= 2:
            self._other_steps.clear()
            self._own_loss = None  # (a sequential second phase: the first one's optimizer is done)
            # a model not watched before, trained instead of the last one: a new phase from its
            # first step (an encoder frozen after warm-up, its decoder's optimizer going on alone, is not)
            if optimizer in self._new_model and not params_of(optimizer) & params_of(self._optimizer):
                self._events.append((since, "new_phase", f"{type(optimizer).__name__} trains another model"))
            # the last one's layers it does not train stop on purpose, in a new model too (a LoRA
            # model's frozen base, pretrained in the first phase, runs there with no gradient)
            self._say_stopped(self._optimizer, optimizer, since)
            self.adopt_optimizer(optimizer)
            return
        if own:
            self._own_loss = type(optimizer).__name__
            if first and (optimizer in self._new_model or params_of(optimizer) & params_of(self._optimizer)):
                # its first step, on a loss of its own, for a model not watched yet or for the step
                # optimizer's own weights: a second training phase far more likely than a GAN's
                # partner. It ends the step, so the phase's first step is not merged into its second
                self._ending = optimizer
        if self._window.snapshot is None and self._params and (rec := self._current()) is not None and rec.sampled:
            self._window.take(rec)  # (stepping right after the adopted one, it opens the next step)

    def _rediscover(self, optimizer: torch.optim.Optimizer) -> None:
        """Models are looked for again, for `optimizer`'s: until it has run with gradients (found),
        at least DISCOVERY_STEPS and at most AWAIT_STEPS steps."""
        if not self._discovery:
            self._discovery = [register_module_forward_pre_hook(self._enter_module),
                               register_module_forward_hook(self._leave_module)]
        self._discover_until = self._step + DISCOVERY_STEPS
        self._awaited.add(optimizer)
        self._await_until = self._step + AWAIT_STEPS

    def _awaiting(self) -> bool:
        """An optimizer's model is still to be found (its parameters in no watched model)."""
        for optimizer in list(self._awaited):
            if not self._holds_unwatched(p for group in optimizer.param_groups for p in group["params"]):
                self._awaited.discard(optimizer)
        return bool(self._awaited) and self._step < self._await_until

    def _global_post(self, optimizer, args, kwargs) -> None:
        if not self._thread.mine(claim=False) or self._backward_running():
            return  # (an optimizer in backward: see _fused_step)
        self._backward_since_step = False  # any optimizer's step uses the backwards' gradients
        if optimizer is self._ending:
            self._ending = None
            if self._attached:
                self._close_step()
        else:
            self._after_step(optimizer)

    def _end_step(self, count: bool = True) -> None:
        self._depth, self._in_backward = 0, False  # a forward or backward that raised never reached its post-hook
        super()._end_step(count)
        if self._discovery and self._step >= self._discover_until and not self._awaiting():
            self._stop_discovery()
        self.step_thread = threading.get_ident()
        if self.the_command:
            self._claim_store()
        if self.flush_requested is not None:  # a signal waits in the main thread: exit_signals
            done, self.flush_requested = self.flush_requested, None
            with contextlib.suppress(Exception):
                self.flush()
            self.hold_training(threading.main_thread().ident)
            done.set()

    def hold_training(self, thread: int | None = None) -> None:
        """Dying of a signal: see TrainingThread.hold."""
        self._thread.hold(thread)

    def _stop_discovery(self) -> None:
        for handle in self._discovery:
            handle.remove()
        self._discovery = []

    def detach(self) -> None:
        with self._uninterrupted():
            self._stop_discovery()
            super().detach()
        if self._untrained and self.store_path is None:
            _say("gradwatch: backward passes, but no optimizer step and no weight changed: this process "
                 "trained nothing, so nothing was recorded")
            self._untrained = 0
        self._say_forwards_only()
        self._say_refused()

    def _say_refused(self) -> None:
        """Nothing stored, and other threads' backwards or steps were refused (see one_thread):
        the run's summary said only "no training step was seen". Said once, naming them."""
        refused, self._thread.refused = self._thread.refused, {}
        if refused and self.store_path is None and self.pid == os.getpid():
            followed = self._thread.name
            names = ", ".join(sorted(set(refused.values()))[:3])
            _say(f"gradwatch: nothing was recorded: zero-code watching follows one thread per process, here "
                 f"{followed}, which stored no training step; the backward passes and optimizer steps of {names} were "
                 "ignored. To record that training, run it in the thread that runs the model first, or call "
                 "gw.watch(model, optimizer) in the script")

    def _say_forwards_only(self) -> None:
        """A model ran with gradients on, but no backward pass came: a training by torch.func (grad
        of a functional_call, the weights updated by hand) was summarised as "no training step was
        seen", which did not say why. Said once, by the process `gradwatch run` started."""
        if self._models and not self._backward_seen and self.store_path is None and self.the_command \
                and self.pid == os.getpid():
            self._backward_seen = True  # (said once)
            names = ", ".join(type(m).__name__ for m, _ in self._models[:3])
            _say(f"gradwatch: {names} ran with gradients on, but no backward pass (loss.backward()) and no optimizer "
                 "step were seen, so nothing was recorded. Gradients taken with torch.func.grad or torch.autograd.grad "
                 "and applied by hand never reach the parameters' .grad, and cannot be watched")

    def forget(self) -> None:
        """In a forked child (a DataLoader worker, a fork Pool's): the parent's watch, copied,
        must not record or write: a worker that trained wrote its steps and the parent's unflushed
        ones into the parent's store, through the parent's connection. Its hooks go, its steps
        are dropped unwritten, and the connection is left alone (closing it could checkpoint the
        parent's live WAL)."""
        _forgotten.append(self)  # never collected, so never closed
        self._window.snapshot = self._cur = self._dist = None
        self._pending, self._events, self.on_flush = [], [], []
        self._untrained = 0
        self.detach()


def _for_replay(root: torch.Tensor) -> torch.Tensor:
    """A refused backward's root as `_replay` reads it at the step: without its graph (which holds
    its inputs: a saliency thread's batch and its gradient); under a GradScaler, the loss before
    scaling, as GradScaler.step unscales the gradients before the step (read as scaled, step 0's
    norms were 1/1024 of the run's without the other thread)."""
    unscaled = getattr(root, UNSCALED, None)
    return unscaled[0] if unscaled is not None else root.detach()


def steps_taken(optimizer: torch.optim.Optimizer) -> int | None:
    """The steps an optimizer's state counts (Adam, AdamW, RMSprop, Adagrad...: `step` per
    parameter; the largest, since a parameter that got no gradient skipped some); None for one
    that keeps no count (SGD's momentum buffers, or no state at all)."""
    counts = [s["step"] for s in optimizer.state.values() if isinstance(s, dict) and "step" in s]
    if not counts:
        return None
    return max(int(c) for c in counts)  # (a one-element tensor or a number)


def _mark_if_training(run_dir: str) -> None:
    """A forked process (a fork Pool's worker) that trains is not recorded: its first optimizer step
    marks the run directory, so that `gradwatch run` says so instead of "no training step was seen".
    DataLoader workers never step one: the hook costs them nothing."""
    marked = False

    def hook(optimizer, args, kwargs) -> None:
        nonlocal marked
        if not marked:  # (left in place: removed while torch iterates the hooks, it would break the step)
            marked = True
            _mark(run_dir, FORKED_MARK)
    _forked_hooks.append(register_optimizer_step_pre_hook(hook))


def _mark(run_dir: str, name: str) -> None:
    """An empty file `name` in the run directory, for `gradwatch run`'s summary (runner's marks)."""
    with contextlib.suppress(OSError):
        os.close(os.open(os.path.join(run_dir, name), os.O_CREAT | os.O_WRONLY, 0o666))


_forgotten: list[AutoWatch] = []
_forked_hooks: list = []


def start_from_env(number_resumed: bool = True) -> AutoWatch | None:
    """Start zero-code watching if `gradwatch run` asked for it (idempotent). `number_resumed`:
    see AutoWatch (off in `gradwatch fix`'s trials)."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir or getattr(start_from_env, "watch", None) is not None:
        return None
    options = {k: int(os.environ[v]) for k, v in ENV_OPTIONS.items() if os.environ.get(v)}
    watch = AutoWatch(run_dir, number_resumed=number_resumed, **options)
    start_from_env.watch = watch
    _mark(run_dir, WATCHED_MARK)  # tells `gradwatch run` that the start-up hook worked here
    atexit.register(store_last_steps, watch)
    os.register_at_fork(after_in_child=_after_fork_in_child)
    quiet_global_hook_warning()  # (the discovery hooks take the wrapper's inner model: AutoWatch._discover)
    exit_signals.install(own_watch)
    _flush_on_os_exit()
    _no_collectives_after_a_crash()
    return watch


def own_watch() -> AutoWatch | None:
    """The watch made in this process; None in a forked one that has none of its own (a
    DataLoader worker: the parent's, copied, must not write)."""
    watch = getattr(start_from_env, "watch", None)
    return watch if watch is not None and watch.pid == os.getpid() else None


def _after_fork_in_child() -> None:
    """A forked process (a DataLoader worker, a fork Pool's) drops the parent's watch (`forget`)
    and only marks the run if it trains (`_mark_if_training`); the start-up hook puts its signal
    handlers back to the default (_bootstrap). Watching a fork Pool's workers was
    tried: a worker then caught the SIGTERM of `Pool.__exit__`, and 2 runs in 16 hung there."""
    parent = start_from_env.watch
    parent.forget()
    _mark_if_training(parent.run_dir)


def _flush_on_os_exit() -> None:
    """`os._exit` (scripts end with it to skip a slow teardown, and so does every forked
    multiprocessing worker) and `os.execv`/`os.execve` (a script that restarts itself; os.execl,
    execvp and the rest call these) run no atexit: the steps since the last flush were lost, all of
    them in a run shorter than one flush (a 20-step stage before an execv: none stored). Stored
    first, by a process with a watch of its own only (a forked worker has none, and must not write)."""
    if hasattr(os, "_exit"):
        os._exit = _storing_first(os._exit, store_last_steps)
    for name in ("execv", "execve"):
        if hasattr(os, name):
            setattr(os, name, _storing_first(getattr(os, name), _flush))


def _flush(watch: AutoWatch) -> None:
    """Before an exec: the steps so far stored, the watch left attached. An exec can fail (OSError,
    which a script may catch and train on), and os.execvp tries each PATH entry in turn: detached
    there, every later step was lost unsaid (20 of 50 stored)."""
    watch.flush()


def _storing_first(leave: Callable, store: Callable[[AutoWatch], None]) -> Callable:
    """`leave` (a call that ends this process's Python, or replaces it), `store` run on the watch first."""
    @functools.wraps(leave)
    def storing_first(*args, **kwargs):
        watch = own_watch()
        if watch is not None:
            with contextlib.suppress(Exception):  # leaving anyway: what was flushed before stays
                store(watch)
        return leave(*args, **kwargs)
    return storing_first


def _first_line(error: BaseException, width: int = 160) -> str:
    """An error's first line, cut at a word (gloo's errors run to several hundred characters)."""
    lines = str(error).strip().splitlines()
    return textwrap.shorten(lines[0], width, placeholder=" ...") if lines else ""


def _no_collectives_after_a_crash() -> None:
    """An uncaught exception ends this rank while the others wait in the training's next
    collective: the exit flush must not start one of its own (it waited for the group's timeout,
    30 minutes by default, where the run without gradwatch failed in seconds)."""
    previous = sys.excepthook

    def excepthook(kind, value, tb) -> None:
        watch = own_watch()
        if watch is not None:
            watch.abandon_collectives(f"it ended on {kind.__name__}: {_first_line(value)}")
        previous(kind, value, tb)

    sys.excepthook = excepthook
