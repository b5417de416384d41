"""`Watch`: per-layer gradient statistics of a training run, at an overhead nobody notices.

Schedule (docs/statistics.md): every recorded step costs one fused norm over the gradients and a
copy of the loss, all on the device. Every `sample_every` steps the costlier statistics are taken
too: max |g|, weight norms, update ratios, activation statistics, ∂L/∂(layer output) and recurrent
time profiles; the hooks they need exist only during those steps. The host reads the device only
at a flush (every `flush_every` recorded steps), except on the CPU, where checking a step's norms
for NaN/Inf costs nothing and gives an exact count of non-finite gradient entries.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import sqlite3
import sys
import threading
import warnings
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradwatch.collect import distributed, patches
from gradwatch.collect.caller_names import caller_line
from gradwatch.collect.exit_signals import store_last_steps
from gradwatch.collect.forward_order import ForwardOrder
from gradwatch.collect.layers import Layer, compiled_inner, discover, has_lazy_params, newly_trainable, rename
from gradwatch.collect.record import StepRecord, to_batch
from gradwatch.collect.sampled_hooks import SampledHooks
from gradwatch.collect.small_grads import SMALL_GRAD, SmallGrads
from gradwatch.collect.stale_grads import STALE_KEY, StaleCheck
from gradwatch.collect.stats import MISSING, entries, norm32
from gradwatch.collect.update_window import UpdateWindow, params_of
from gradwatch.errors import ConfigError, TrainingStopped
from gradwatch.say import say
from gradwatch.store.reader import STORE_NAME, StoreFollower
from gradwatch.store.series import LayerInfo, RunSeries
from gradwatch.store.writer import RunStoreWriter

LATE_CLIP = "late_clip"  # an event: gradients clipped after the step that used them (store/reader.py)
REPEATED_BACKWARD = "repeated_backward"  # an event: a second backward of the same loss in one step
LOSS_BROADCAST = "loss_broadcast"  # an event: torch warned that a loss's target broadcasts against its input
# torch.nn.functional's warning (mse_loss, l1_loss, smooth_l1_loss, huber_loss), with both shapes
_TARGET_SIZE = re.compile(r"target size \(torch\.Size\(\[([\d, ]*)\]\)\) that is different to the input size "
                          r"\(torch\.Size\(\[([\d, ]*)\]\)\)")
MAX_ACCUMULATION = 64  # backwards per optimizer step that zero-code mode waits for before the first step


def layer_info(layer: Layer) -> LayerInfo:
    return LayerInfo(
        name=layer.name,
        type=layer.type,
        index=layer.index,
        role=layer.role,
        n_params=sum(p.numel() for p in layer.params),
        activation=layer.activation,
    )


FLOAT32_MAX = torch.finfo(torch.float32).max


# the run's meta: the loss takes a derivative of a derivative of the model with create_graph (a PINN's
# u''): its second derivatives train, and a ReLU's are 0 (one derivative, a gradient penalty's, is not)
INPUT_DERIVATIVES = "input_derivatives"
# ... and a model holds an nn.Embedding(sparse=True): its gradients are sparse, which Adam refuses
SPARSE_GRADIENTS = "sparse_gradients"


def optimizer_meta(optimizer: torch.optim.Optimizer | None) -> dict:
    """What the rules need to know of the optimizer: its class, and its largest momentum (an SGD
    step with momentum is not lr·g)."""
    if optimizer is None:
        return {"optimizer": None}
    momenta = [float(g["momentum"]) for g in optimizer.param_groups if isinstance(g.get("momentum"), (int, float))]
    return {"optimizer": type(optimizer).__name__, **({"momentum": max(momenta)} if momenta else {})}  # Adam has none


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: expected a whole number >= 1")
    return value


def _store_path(out: str | os.PathLike | None) -> Path | None:
    if out is None:
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise ConfigError(f"out={out!r}: expected a directory path (a str or Path), or None to keep the run in memory")
    path = Path(out)
    path = path if path.suffix == ".sqlite" else path / STORE_NAME
    try:  # now, not at the first flush: a bad `out` must not stop training steps later
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out={str(out)!r}: cannot create the run directory ({exc.strerror}); "
                          "pass a directory you can write to, or out=None to keep the run in memory") from None
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"out={str(out)!r}: the run directory is not writable; pass one you can write to")
    return path


class Watch:
    """Watches one model (or, in zero-code mode, every model that runs) and its optimizer.

    Use as a context manager or call `detach()`; detaching removes every hook and patch, leaving
    the model and optimizer exactly as they were. Nothing here changes the numbers of training.
    `first_step`: the number of the first step, N > 0 for a training resumed at step N (a
    framework's global step), which appends to the store in `out` instead of replacing it.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 1,
        sample_every: int = 10,
        flush_every: int = 50,
        out: str | os.PathLike | None = None,
        meta: dict | None = None,
        on_finding: Callable | None = None,
        stop_on: Iterable[str] = (),
        warn: bool = True,
        all_ranks: bool = False,
        status: bool | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        first_step: int = 0,
    ):
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(
                f"watch() needs a torch.nn.Module, got {type(model).__name__}; pass the model itself"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.every = positive_int("every", every)
        self.sample_every = positive_int("sample_every", sample_every)
        self.flush_every = positive_int("flush_every", flush_every)
        if isinstance(first_step, bool) or not isinstance(first_step, int) or first_step < 0:
            raise ConfigError(f"first_step={first_step!r}: expected a whole number >= 0")
        self.first_step = first_step
        self.store_path = _store_path(out)
        self._meta = {
            "torch": torch.__version__,
            "every": self.every,
            "sample_every": self.sample_every,
            **optimizer_meta(optimizer),
            **(meta or {}),
        }
        if "command" not in self._meta:  # ("command" marks a `gradwatch run` store, whose end it records)
            self._meta["argv"] = list(sys.argv)  # (diagnose's `gradwatch fix -- python ...`)
        self._writer: RunStoreWriter | None = None
        self._follower: StoreFollower | None = None  # the live check's reader: new steps only
        self.all_ranks = bool(all_ranks)
        self._dist: distributed.Distributed | None = None  # set when a DDP/FSDP model is added
        self._layers: list[Layer] = []
        self._params: list[torch.nn.Parameter] = []
        self._seen_params: set[int] = set()
        self._seen_modules: set[int] = set()
        self._models: list[tuple[nn.Module, str]] = []  # each with the prefix of its layers' names
        self._optimizer = optimizer
        self._mode = "optimizer" if optimizer is not None else ("backward" if model is not None else "unknown")
        self._step = first_step
        self._accumulated = 0  # zero-code mode: backwards before the first optimizer step left the weights as they were
        self._cur: StepRecord | None = None
        self._pending: list[StepRecord] = []
        self._events: list[tuple[int, str, str]] = []
        # optimizers seen stepping, each with its groups' lrs at its last step: a scheduler sets
        # lr 0 after the last one (HF's linear decay), when the final flush asks who trains what
        self._stepping: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._store_failed = False  # the store could not be written (a full disk): recording stopped
        self._outside: list[str] = []  # layers in none of them, as last said
        self._window = UpdateWindow(self)  # when each step's update ‖Δw‖ is complete
        self._touched: list[bool] = []  # parameter index -> a gradient reached it since the last step
        self._backward_scale: torch.Tensor | None = None
        self._stepped = False
        self._backward_since_step = False  # its gradients await an optimizer step (or none)
        self._reached = False  # a backward since the step reached the watched weights
        self._rival = None  # ... and another optimizer stepped after it: see _rival_objective
        self._rival_said = False
        self._cleared_said = False
        self._read_early: set[int] = set()  # parameters read before an optimizer in backward cleared them (zero-code)
        self._in_step = False  # between the optimizer's step pre- and post-hook (closures)
        self._closure_loss = False  # a closure's loss was added in this step
        self._late_clip_said = False  # a clipping after the step was noted (see clipped)
        self._last_loss: tuple[weakref.ref, int] | None = None  # the last backward's loss and its step
        self._again = False  # this backward is of the same loss as the last one in the step, uncleared
        self._again_said = False
        self._broadcast_said = False
        self._consumed: tuple | None = None  # (param, its grad, the grad's version) as the last step used it
        self._clipped_before_step = self._clipped_at_step = False  # a clip before the coming / last step
        self._said_unflushed = False  # findings() under DDP said what it cannot read yet
        self._closure_grads = False  # a closure's gradients were recorded in this step
        self._new_params_due = False  # an optimizer was given weights no layer holds: see params_added
        self._frozen: list[torch.Tensor] = []  # parameters not hooked: requires_grad False (`_unfrozen`)
        self._reevaluating = False  # the closure is being called again in this step (LBFGS): see before_backward
        self._grads_seen = 0  # gradients accumulated into watched parameters, ever
        self._grads_before = 0  # ... when the current backward began
        self._handles: list = []  # permanent hooks, removed by detach()
        self._grad_handles: dict[int, object] = {}  # parameter index -> its post-accumulate-grad hook
        self._grad_fns: dict[int, Callable] = {}  # ... and the function it calls
        self._foreign: set[int] = set()  # threads whose calls the hooks ignore (zero-code mode: one_thread)
        self._norm_buf = self._max_buf = None
        self._small = SmallGrads()  # small gradients the hooks keep, read together after backward
        self._stale = StaleCheck()  # a gradient carried into the next step: a forgotten zero_grad()
        # None: this step is not recorded
        self._cur_sampled: bool | None = self._sampled(first_step) if self._recorded(first_step) else None
        # living for one sampled step
        self._sampled_hooks = SampledHooks(self._current_here, self._unscale, lambda: not self._reevaluating,
                                           lambda: self._meta.__setitem__(INPUT_DERIVATIVES, True))
        self._order = ForwardOrder()
        self._unordered: int | None = None  # a step whose forward ran before its model was found (_end_step)
        self._attached = False
        self._paused = False
        self.on_flush: list[Callable[["Watch"], None]] = []
        self._live = None
        if on_finding is not None or stop_on or warn:
            from gradwatch.diagnose.live import LiveDiagnosis  # collect runs without diagnose otherwise

            self._live = LiveDiagnosis(on_finding, stop_on, warn)
            self.on_flush.append(self._live)
        if status or (status is None and sys.stderr.isatty()):  # a status line, on a terminal only
            from gradwatch.integrations.terminal import StatusLine

            StatusLine(live=self._live).install(self)
        if tensorboard_dir is not None:
            from gradwatch.integrations.tensorboard import TensorBoardSink

            self.on_flush.append(TensorBoardSink(tensorboard_dir, live=self._live))
        if self.store_path is None:
            self._writer = RunStoreWriter(None, self._meta)
        # a script that ends without detach(), or on an error, still stores its last steps
        self._at_exit = functools.partial(_detach_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)
        self._attach()
        if model is not None:
            self.add_model(model)
            if not self._params:
                self.detach()
                raise ConfigError(
                    f"{type(model).__name__} has no trainable parameters to watch "
                    "(all are frozen or it owns none); unfreeze some or watch the model that trains"
                )
            if optimizer is not None and self._dist is None and not params_of(optimizer) & self._held_params():
                # (its steps would define the steps of a model it never trains: none was recorded)
                self.detach()
                raise ConfigError(
                    f"the optimizer ({type(optimizer).__name__}) holds none of {type(model).__name__}'s parameters; "
                    "pass the optimizer that trains this model, or optimizer=None to take each backward as a step"
                )
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(lambda opt, a, k: self._before_step(opt)))
            self._handles.append(optimizer.register_step_post_hook(lambda opt, a, k: self._after_step(opt)))
            self._partners: dict[int, bool] = {}  # id(other optimizer): it steps watched weights
            self._partner_runs: dict[int, int] = {}  # its steps since the watched one's last
            self._sharing: dict[int, bool] = {}  # id(other optimizer): it holds weights the watched one holds
            self._successor = None  # (a weakref to) an optimizer made mid-run for the watched weights
            self._handles.append(register_optimizer_step_pre_hook(lambda opt, a, k: self._partner_step(opt)))

    # ---------------------------------------------------------------- public API
    @property
    def step(self) -> int:
        """The number of the step being recorded now (counted from `first_step`)."""
        return self._step

    @property
    def layers(self) -> list[LayerInfo]:
        return [layer_info(l) for l in self._layers]

    def add_model(self, model: nn.Module, prefix: str = "") -> None:
        """Watch another model (zero-code mode finds them as they first run)."""
        inner = compiled_inner(model)
        if inner is not None:  # torch.compile(model): its layers, named as the model's own
            self._sampled_hooks.add_compiled(model)
            model = inner
        if has_lazy_params(model):
            raise ConfigError(f"{type(model).__name__} has uninitialised parameters (a Lazy module): run one "
                              "forward pass first (model(example_batch)), then watch it")
        self._add_model(model, prefix)

    def _add_model(self, model: nn.Module, prefix: str, taken: Sequence[Layer] = ()) -> None:
        """`taken`: layers found in pieces of `model` that ran on their own before it (zero-code
        mode: its layers called one by one, a slice `model[:2]`); named again as its layers, and
        numbered again by its next forward."""
        model = self._adopt_distributed(model)
        new = discover(model, prefix, self._seen_params, self._seen_modules)
        self._models.append((model, prefix))  # also with nothing trainable yet: see _watch_new_params
        if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in model.modules()):
            self._meta[SPARSE_GRADIENTS] = True  # (Adam takes no sparse gradient: diagnose and fix offer none)
        if taken:
            rename(taken, model, prefix)
        if new and self._cur_sampled is False:
            # a model found mid-run (the next phase's): its first step is sampled, so the weights
            # before its first update are known (the measure of their growth)
            self._cur_sampled = True
            if self._cur is not None:
                self._cur.sampled = True
        if new or taken:
            self._add_layers(model, new, renumber=bool(taken))

    def _watch_new_params(self) -> None:
        """Parameters made trainable after their model was discovered (a frozen backbone unfrozen
        for fine-tuning) join as layers from the next flush window on; looked for at each flush."""
        self._hook_grads()
        known = {id(layer.module) for layer in self._layers}
        for model, prefix in self._models:
            new = newly_trainable(model, prefix, self._seen_params, known)
            if new:
                self._add_layers(model, new, renumber=True)

    def _add_layers(self, model: nn.Module, new: list[Layer], renumber: bool = False) -> None:
        """`renumber`: the model's layers are numbered again by their next forward, so the new ones
        (an unfrozen backbone) take their place below the layers that were there before them."""
        self._settle_window()  # Δw over the parameters as they were
        self.flush()  # a flush window has one fixed set of layers
        self._layers.extend(new)
        if renumber:
            inside = {id(m) for m in model.modules()}
            new = [layer for layer in self._layers if id(layer.module) in inside]
            for layer in new:
                layer.index = -1
        self._params = [p for layer in self._layers for p in layer.params]
        if self._dist is not None:
            for layer in new:
                layer.name = distributed.clean_name(layer.name, layer.type)
            self._dist.set_params(self._params)
        self._register_grad_hooks()
        self._order.register(model, new, self._params if self._dist is None else [])
        if self._cur_sampled:  # armed before (for its first pieces): the new layers too
            self._sampled_hooks.disarm()
            self._sampled_hooks.arm(self._layers)

    def _forget_models(self, models: Sequence[nn.Module]) -> None:
        """Stop watching `models`, none of whose layers is stored yet, as if they had never run
        (zero-code mode: models a thread found and never trained before it handed the watch
        over): their layers, names and hooks go, and the step's record, whose statistics are
        indexed by the layers' positions, starts again."""
        self._models = [(m, prefix) for m, prefix in self._models if not any(m is x for x in models)]
        kept = {id(m) for model, _ in self._models for m in model.modules()}
        gone = {id(m) for model in models for m in model.modules()} - kept
        dropped = {id(l) for l in self._layers if id(l.module) in gone}
        self._seen_params -= {id(p) for l in self._layers if id(l) in dropped for p in l.params}
        self._seen_modules -= gone
        self._layers = [l for l in self._layers if id(l) not in dropped]
        self._params = [p for layer in self._layers for p in layer.params]
        self._register_grad_hooks()
        self._order.remove_hooks()  # (its gradient hooks index the parameters as they were)
        for model, _ in self._models:
            inside = {id(m) for m in model.modules()}
            unnumbered = [l for l in self._layers if l.index < 0 and id(l.module) in inside]
            if unnumbered:
                self._order.register(model, unnumbered, self._params)
        self._cur = None
        self._window.drop()
        self._sampled_hooks.disarm()
        if self._cur_sampled and self._attached:
            self._sampled_hooks.arm(self._layers)

    def _adopt_distributed(self, model: nn.Module) -> nn.Module:
        """A DDP/FSDP model: its layers keep their own names, and gradients are read once synchronised."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return model
        inner, kind, group, sharded = distributed.unwrap(model)
        if kind is None:
            return model
        self._seen_modules.add(id(model))
        if self._dist is None:
            self._dist = distributed.Distributed(kind, group, self.all_ranks)
            self._dist.flush_before_teardown(self._last_flush)
            self._meta["distributed"] = self._dist.meta
        self._dist.sharded_ids |= sharded
        return inner

    def _say_unsynchronised(self) -> None:
        """Several ranks train, and no watched model is a DDP/FSDP one: the norms are each rank's
        own gradients. Right for ranks that train apart; wrong, silently, for a model wrapped
        after it was watched (gw.watch before init_process_group: 0.83 stored for 1.33)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() == 0:
            say(f"gradwatch: {dist.get_world_size()} ranks, and the watched model is not a DDP/FSDP module: the "
                "statistics are rank 0's own gradients, before any all-reduce. If the model is wrapped, watch "
                "it after init_process_group and DDP(...)/FSDP(...)")

    def _register_grad_hooks(self) -> None:
        """Norms are taken the moment each gradient is accumulated, while it is still in cache:
        reading it again after backward costs a full pass over memory (measured ~3% of a step)."""
        for handle in self._grad_handles.values():
            handle.remove()
        self._grad_handles, self._grad_fns = {}, {}
        if not self._params:
            return
        device = self._params[0].device
        n = len(self._params)
        self._norm_buf = torch.full((n,), MISSING, device=device)
        self._max_buf = torch.full((n,), MISSING, device=device)
        self._weight_buf = torch.full((n,), MISSING, device=device)
        self._touched = [False] * n
        self._stale.forget_positions()
        self._small.clear()
        self._window.drop()
        self._hook_grads()

    def _hook_grads(self) -> None:
        """Hook each trainable parameter not hooked yet. torch refuses a hook on a frozen one (a
        backbone frozen after pretraining, shared by the next model), which gets no gradient
        anyway: it is hooked at the end of the first step after it is unfrozen (`_unfrozen`)."""
        if self._dist is not None:  # local gradients: the synchronised ones are read after backward
            return
        for i, p in enumerate(self._params):
            if p.requires_grad and i not in self._grad_handles:
                small = 0 < p.numel() <= SMALL_GRAD and p.device == self._norm_buf.device
                self._grad_fns[i] = self._grad_hook(i, small)
                self._grad_handles[i] = p.register_post_accumulate_grad_hook(self._grad_fns[i])
        hooked = {id(self._params[i]) for i in self._grad_handles}  # (a hook outlives requires_grad changes)
        self._frozen = [p for model, _ in self._models for p in model.parameters()
                        if not p.requires_grad and id(p) not in hooked]

    def _unfrozen(self) -> bool:
        """A frozen parameter made trainable since: a backbone unfrozen for fine-tuning went
        unrecorded until the next flush, up to 50 steps (one attribute read per frozen tensor a step)."""
        return any(p.requires_grad for p in self._frozen)

    def _grad_hook(self, i: int, small: bool):
        """`small`: a gradient too small to gain from being read in cache is only kept, for
        `SmallGrads.read` to take with the others after backward."""
        norm_out, max_out, weight_out = self._norm_buf[i], self._max_buf[i], self._weight_buf[i]
        indices, grads, touched, foreign = self._small.indices, self._small.grads, self._touched, self._foreign
        read_early = self._read_early

        def hook(p: torch.Tensor) -> None:
            if foreign and threading.get_ident() in foreign:  # another thread's backward (zero-code mode)
                return
            self._grads_seen += 1
            touched[i] = True
            if self._attached and self._cur_sampled is not None:
                grad = p.grad  # (read once: 2000 hooks a step)
                if grad is None:  # an earlier hook stepped and cleared it (an optimizer fused into backward)
                    if i not in read_early:  # (read before that step: AutoWatch._fused_step)
                        self._say_cleared(p)
                    return
                if small and not grad.is_sparse:
                    indices.append(i)
                    grads.append(grad)  # (kept: a later hook may set p.grad to None)
                    return
                g = entries(grad.detach())  # (backward(create_graph=True): a gradient with a graph)
                norm32(g, out=norm_out)
                if self._cur_sampled:  # p was just read by backward too: both are in cache
                    if g.numel():  # max |g|: amax and amin, each ~30x faster than the inf-norm on the
                        # CPU, and together ~3x faster than aminmax on a 512x512 gradient (same values)
                        torch.maximum(g.amax().float(), g.amin().float().neg(), out=max_out)
                    else:
                        max_out.zero_()
                    norm32(p.detach(), out=weight_out)
        return hook

    def _say_cleared(self, p: torch.Tensor) -> None:
        """Once: recording nothing for these gradients, silently, read as a run with no gradients."""
        if not self._cleared_said:
            self._cleared_said = True
            say(f"gradwatch: a gradient hook registered before the watch cleared p.grad during backward ({tuple(p.shape)}: "
                "an optimizer fused into backward?): those gradients are not recorded, and no finding can read them; "
                "to record them, call gw.watch(model, optimizer) in the script before that hook is registered "
                "(under gradwatch run too)")

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Record this step's loss explicitly (instead of the tensor `.backward()` was called on)."""
        rec = self._current()
        if rec is not None:
            rec.loss_sum, rec.loss_n = None, 0
            rec.add_loss(torch.as_tensor(loss))
            rec.loss_explicit = True

    def note_event(self, step: int, kind: str, detail: str) -> None:
        """An event row for the store, written with the next flush (the live diagnosis notes what
        it said while training, so the end of a `gradwatch run` can tell what it no longer keeps)."""
        self._events.append((step, kind, detail))

    def pause(self) -> None:
        """Stop recording (e.g. around evaluation) until `resume()`; hooks stay, but do nothing."""
        if self._attached:
            self._settle_window()  # updates while paused are no step's
            self._stale.disarm()  # backwards while paused are not seen
            patches.remove(self)
            self._sampled_hooks.disarm()
            self._attached = False
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._attach()
            if self._cur_sampled:
                self._sampled_hooks.arm(self._layers)

    def flush(self) -> None:
        """Move the recorded steps to the store in one transaction."""
        if not self._pending and not self._events:
            return
        if not self._window.partner_after:  # no partner steps after the step's optimizer: its update is complete
            self._settle_window()
        # a step whose update is still to come (weights changed by hand, or by a partner stepping
        # after the step's optimizer) waits for its Δw
        ready = [r for r in self._pending if r is not self._window.rec]
        self._say_outside_optimizers()
        self._stale.note(self._meta, self._param_name)
        if self._dist is not None:  # collective: every rank flushes at the same steps
            self._events.extend(self._dist.exchange(ready))
        if (self._dist is None or self._dist.writes) and not self._store_failed:
            try:
                self._write(ready)
            except (sqlite3.Error, OSError) as exc:  # a full disk: the training it watches goes on
                self._store_failed = True
                say(f"gradwatch: cannot write the run store {str(self.store_path)!r} ({exc}); recording stops "
                    "here, training goes on")
        self._pending = [r for r in self._pending if r is self._window.rec]
        self._events = []
        for callback in list(self.on_flush):
            callback(self)

    def _write(self, ready: list[StepRecord]) -> None:
        if self._writer is None:
            if self._dist is not None:
                self.store_path = self._dist.store_path(self.store_path)
            else:
                self._say_unsynchronised()
            self.store_path.parent.mkdir(parents=True, exist_ok=True)
            # a training resumed at first_step continues the run stored there
            self._writer = RunStoreWriter(self.store_path, self._meta, resume_at=self.first_step)
        meta = {k: self._meta[k] for k in ("optimizer", "momentum", "distributed", "grad_clip", STALE_KEY, INPUT_DERIVATIVES,
                                           SPARSE_GRADIENTS) if k in self._meta}
        meta["lr_scale"] = self._lr_scales()
        # (a GAN's: diagnosed one by one; a module with no parameters, a loss module the script calls,
        # is no model: a report listed `lf`, its nn.CrossEntropyLoss)
        meta["models"] = [prefix for model, prefix in self._models if any(True for _ in model.parameters())]
        if self._sampled_hooks.output_layers:  # (the output's own activations, every head's: diagnose.signals)
            meta["output_layers"] = sorted(self._sampled_hooks.output_layers)
        batch = to_batch(ready, self._layers, meta=meta)
        batch.events.extend(self._events)
        self._writer.write(batch)

    def _lr_scales(self) -> dict[str, float]:
        """Each layer's learning rate over the largest, where the step optimizer's param groups
        give layers different ones (discriminative fine-tuning: a backbone at lr/1000 on purpose);
        empty when they share one. The stalled rule compares updates per unit of learning rate."""
        groups = getattr(self._optimizer, "param_groups", None) or []
        lrs = [g.get("lr") for g in groups]
        if len(groups) < 2 or not all(isinstance(lr, (int, float)) for lr in lrs) or len(set(lrs)) < 2 or max(lrs) <= 0:
            return {}
        lr_of = {id(p): float(g["lr"]) for g in groups for p in g["params"]}
        top = float(max(lrs))
        out = {}
        for layer in self._layers:
            held = [lr_of[id(p)] for p in layer.params if id(p) in lr_of]
            if held:
                out[layer.name] = max(held) / top
        return out

    def series(self) -> RunSeries:
        """Everything recorded so far (flushes first; across processes, what the last flush stored),
        each metric a read-only steps x layers array. The last step's update ends here: a partner's
        after this call is the next step's."""
        return self._flushed().dense()

    def _flushed(self) -> RunSeries:
        """`stored_series()` after a flush: the rules read it as it is (`RecordedRows` metrics)."""
        self._settle_window()
        if self._window.snapshot is not None and self._mode != "optimizer":
            self._window.finish()  # read after a manual update: that update is the last Δw
        if self._dist is None:  # a distributed flush is collective: not from one rank's call
            self.flush()
        return self.stored_series()

    def _settle_window(self) -> None:
        """End the last step's update window now (see UpdateWindow.settle): its backwards since are
        the next step's unless no optimizer step has used them."""
        self._window.settle(kept=not self._unused_backward())

    def _unused_backward(self) -> bool:
        """A backward since the last optimizer step, and no step since to use its gradients."""
        return self._mode == "optimizer" and self._backward_since_step

    def stored_series(self) -> RunSeries:
        """What has been flushed so far, read without touching the step being recorded: only the
        steps flushed since the last call are read (its arrays are read-only, shared with the next)."""
        if self._writer is None:
            return RunSeries([], np.empty(0, dtype=np.int64), np.empty(0), np.empty(0), {})
        if self._follower is None:
            self._follower = StoreFollower(self._writer.connection)
        return self._follower.read()

    def findings(self) -> list:
        """The findings of everything recorded so far (see `gradwatch.diagnose`). Under DDP/FSDP, of
        what the ranks last stored together: a flush there is collective, not one rank's call."""
        from gradwatch.diagnose import diagnose

        series = self._flushed()
        if self._dist is not None and self._pending and not self._said_unflushed:
            self._said_unflushed = True
            last = f"up to step {int(series.steps[-1])}" if len(series.steps) else "none yet"
            say(f"gradwatch: under DDP/FSDP, findings() reads the steps the ranks stored together ({last}); the "
                f"{len(self._pending)} since are stored at the next flush (every {self.flush_every} steps) or when "
                "the process group is destroyed, and then diagnosed")
        return diagnose(series)

    def _last_flush(self) -> None:
        """Under DDP/FSDP, as the process group goes (or the process ends): the last window stored,
        then what the live diagnosis has not checked yet diagnosed (as detach does)."""
        self.flush()
        if self._live is not None:  # (the other callbacks, the status line's, stay: training may go on)
            self._live.close()

    def detach(self) -> None:
        """Flush, then remove every hook and patch: the model and optimizer are as before."""
        if not self._attached and not self._paused:
            return
        if self._attached:
            patches.remove(self)
        self._attached = self._paused = False
        atexit.unregister(self._at_exit)
        # the backwards of a step still open count, unless no optimizer step followed them (an
        # input-gradient check after training: no step of its own)
        unused = self._unused_backward()
        self._window.settle(kept=not unused)
        if self._window.snapshot is not None:
            self._window.finish()
        if self._cur is not None and self._cur.grad is not None and not unused:
            self._end_step(count=False)
        self.flush()
        for callback in self.on_flush:  # status line, TensorBoard sink: end the line, close files
            getattr(callback, "close", lambda: None)()
        if self._dist is not None:
            self._dist.restore()
        self._sampled_hooks.disarm()
        self._order.remove_hooks()
        for handle in [*self._handles, *self._grad_handles.values()]:
            handle.remove()
        self._handles, self._grad_handles = [], {}

    close = detach

    def mark_closed(self) -> None:
        """The process ends normally with its last steps stored: said in the store, so a run whose
        `gradwatch run` was killed alone (its command ran on to its end) reads whole (store/ending.py)."""
        if self._writer is not None:
            self._writer.mark_closed()

    def abandon_collectives(self, why: str) -> None:
        """The process is ending on an error: flush what is left without the exchange across ranks
        (the other ranks may never join it)."""
        if self._dist is not None and not self._dist.abandoned:
            self._dist.abandon(why)
            self._events.append((self._step, distributed.EXCHANGE_FAILED, f"rank {self._dist.rank}: {why}"[:300]))

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---------------------------------------------------------------- schedule
    def _recorded(self, step: int) -> bool:
        return step % self.every == 0

    def _sampled(self, step: int) -> bool:
        return self._recorded(step) and step % self.sample_every == 0

    def _current(self) -> StepRecord | None:
        if self._cur is None and self._recorded(self._step):
            self._cur = StepRecord(self._step, bool(self._cur_sampled))
        return self._cur

    def _current_here(self) -> StepRecord | None:
        """The step's record, for a hook called in the followed thread (see `_foreign`)."""
        if self._foreign and threading.get_ident() in self._foreign:
            return None
        return self._current()

    def _attach(self) -> None:
        patches.add(self)
        self._attached = True

    # ---------------------------------------------------------------- backward (patches.Listener)
    def before_backward(self, root: object) -> None:
        if self._window.snapshot is not None and self._mode != "optimizer":
            self._window.finish()
        rec = self._cur
        if rec is not None and rec.grad is not None and self._backward_since_step and not self._in_step:
            # a backward before this one, and no optimizer step since
            if self._mode == "unknown" and not self._accumulating(rec):
                self._mode = "backward"  # updates are by hand
                self._end_step()
            elif self._mode != "backward" and self._grads_cleared():
                # cleared unused: a partner's update since is the last step's (a GAN's generator);
                # but where a partner steps before the watched optimizer (an actor-critic's critic,
                # watched by the actor's), it is the next step's, as it was from the first one
                self._window.settle(kept=self._window.partner_first)
                rec.forget_backwards()
                self._clear_grad_buffers()
                self._rival_objective()
        self._stale.before_backward(self._step)  # (the step this backward is in: zero-code mode may have ended one)
        # optimizer.step(closure) calling the closure again after its gradients were cleared (LBFGS
        # evaluates line-search points): the step's gradient is the first call's, the gradient of
        # the step's loss at the weights before the update; a later call's is at a point between.
        # Every backward of the later calls is theirs (each may run several)
        if self._in_step and self._closure_grads and not self._reevaluating and self._grads_cleared():
            self._reevaluating = True
        unscaled = getattr(root, patches.UNSCALED, None)
        self._backward_scale = unscaled[1] if unscaled is not None else None
        self._grads_before = self._grads_seen
        self._again = self._repeated(unscaled[0] if unscaled is not None else root)
        if self._mode == "backward":
            # each backward a step: its update is what changes the weights from its start to the
            # next one's, inside it too. An optimizer fused into backward (torch's recipe: a gradient
            # hook per parameter calling opt.step()) updates them there; taken after the backward,
            # the weights never changed again before the next (every update ratio 0: a false
            # `stalled_layers` error)
            self._take_window(self._current())
        self._sampled_hooks.before_backward(root)

    def _repeated(self, loss: object) -> bool:
        """A backward of the loss the step's last backward started from, its gradients not cleared
        since (`loss.backward(retain_graph=True); loss.backward()`): the same gradient added twice,
        no micro-batch (each has a loss tensor of its own). The loss is recorded once; the first
        is said as an event (rules/repeated_backward.py). One host read, on such a backward only:
        gradients zeroed in place (zero_grad(set_to_none=False)) are a clear, the loss still once."""
        last = self._last_loss
        if last is None or last[0]() is not loss or last[1] != self._step or self._mode == "backward" \
                or not self._backward_since_step or patches.partial_backward() or self._grads_cleared():
            return False
        grad = next((p.grad for p in self._params if p.grad is not None), None)
        if not self._again_said and grad is not None and bool(grad.any()):
            self._again_said = True
            self._events.append((self._step, REPEATED_BACKWARD, json.dumps({"where": caller_line()})))
        return True

    def _take_window(self, rec: StepRecord | None) -> None:
        """The weights as they are now, kept for the Δw of `rec`'s step, if it is sampled and no
        window is open yet."""
        if rec is not None and rec.sampled and self._params and self._window.snapshot is None:
            self._window.take(rec)

    def _grads_cleared(self) -> bool:
        """The gradients of the backwards since the last step are gone (zero_grad() sets them to
        None) with no optimizer step between: those backwards were for something else (an input
        gradient or saliency check before training), and no step will use them. Zeroed in place
        instead (zero_grad(set_to_none=False)), they are not told from accumulation."""
        params = self._params if self._optimizer is None else \
            (p for group in self._optimizer.param_groups for p in group["params"])
        return all(p.grad is None for p in params)  # stops at the first gradient (a weight toggled off keeps its own)

    def _accumulating(self, rec: StepRecord) -> bool:
        """Zero-code mode, a second backward before any optimizer step: weights unchanged since the
        last one mean gradient accumulation (the step is still to come), changed ones an update by
        hand. One host sync, in the first steps only; past MAX_ACCUMULATION unchanged backwards
        (a hand-written loop whose lr starts at 0) the updates are taken as by hand."""
        if rec.delta is None or self._accumulated >= MAX_ACCUMULATION or bool(rec.delta.any()):
            return False
        rec.delta = None  # no update happened: the step's Δw is measured when it does
        self._accumulated += 1
        return True

    def after_backward(self, root: object) -> None:
        self._stale.after_backward()
        rec = self._current()
        if self._reevaluating:
            self._small.clear()  # the hooks kept this call's small gradients: not the step's
            self._backward_scale = None
            return
        unscaled = getattr(root, patches.UNSCALED, None)
        loss = unscaled[0] if unscaled is not None else root
        if rec is not None and self._params:
            # optimizer.step(closure): the closure's first loss is the step's (what step() returns);
            # LBFGS's later calls evaluate line-search points, not micro-batches. Micro-batches
            # accumulated before the step (Lightning runs the last one in the closure) all count.
            # a loss whose backward reached none of the watched weights (a GAN's discriminator loss,
            # for a watch on the generator) is another model's
            reached = self._dist is not None or self._grads_seen > self._grads_before
            self._reached = self._reached or reached
            if (isinstance(loss, torch.Tensor) and loss.numel() == 1 and not rec.loss_explicit and reached
                    and not (self._in_step and self._closure_loss) and not self._again):
                rec.add_loss(loss)
                self._closure_loss = self._in_step
            self._record_grads(rec)
        self._backward_scale = None
        self._backward_since_step = True
        self._last_loss = (weakref.ref(loss), self._step) if isinstance(loss, torch.Tensor) else None
        if self._mode != "optimizer" and rec is not None and rec.sampled and self._dist is None and self._params \
                and not self._stale.armed:  # (an armed check spans an update: StaleCheck._by_hand)
            # no optimizer (yet: zero-code mode's first steps): its weights are updated by hand
            self._stale.arm(None, self._params, self._touched)
        if self._mode == "backward":
            self._stop_if_non_finite(rec)
            self._end_step()
        elif self._in_step:  # optimizer.step(closure): forward and backward run inside the step
            self._closure_grads = True
            self._take_window(rec)  # the weights are still those before this step's update
            self._stop_if_non_finite(rec)  # raising inside the closure: the update never happens

    def after_scaler_update(self) -> None:
        """GradScaler.update ends an iteration; if the optimizer did not step, the scaler skipped it.
        A scaler drives an optimizer: before one is seen stepping (zero-code mode, overflow in the
        first iterations) the steps are still optimizer steps, never backward calls."""
        if self._mode in ("optimizer", "unknown") and not self._stepped and self._cur is not None:
            self._events.append((self._step, "skipped_step", "loss scaler found inf/NaN gradients"))
            self._window.close()  # a snapshot left is the skipped one's
            self._cur = None
            self._mode = "optimizer"
            self._clear_grad_buffers()  # the skipped step's norms must not leak into the next
        self._stepped = False

    def params_added(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer` was given parameters (made, or a group added). Parameters of a watched model
        made trainable since it was watched (a frozen backbone unfrozen for fine-tuning and given to
        the optimizer) are layers from now on, or from the next step if this one has recorded
        something already; the next flush, up to `flush_every` steps later, would lose those steps.
        (Zero-code mode also looks for the model of parameters no watched model holds: AutoWatch.)"""
        if not self._models:
            return
        params = optimizer.param_groups[-1]["params"]  # the group just added
        unseen = [p for p in params if p.requires_grad and id(p) not in self._seen_params]
        if unseen:
            held = self._held_params()
            if any(id(p) in held for p in unseen):
                # (the last step's update window, still open for a partner, closes first)
                if self._cur is None and (self._window.snapshot is None or self._window.late) and not self._in_step:
                    self._watch_new_params()
                else:
                    self._new_params_due = True
        if (getattr(self, "_partners", None) is not None and optimizer is not self._optimizer
                and self._optimizer in self._stepping and any(id(p) in self._seen_params for p in params)):
            # made once training is under way, for the watched weights: the optimizer made anew
            # (another kind for fine-tuning, a schedule by hand), unless the old one steps on
            self._successor = weakref.ref(optimizer)

    def _held_params(self) -> set[int]:
        """ids of every parameter of the watched models, those not watched (frozen when found) too."""
        return {id(p) for model, _ in self._models for p in model.parameters()}

    def _say_stopped(self, old: torch.optim.Optimizer, new: torch.optim.Optimizer, since: int | None = None) -> None:
        """The step's optimizer stopped stepping while another goes on (an encoder's warm-up
        optimizer, all weights trained before the head alone): the layers only it trained stop
        changing on purpose, not for lack of an optimizer. `since`: the new one's first step, where
        its training begins (diagnose reads its loss from there)."""
        held = params_of(new)
        left = params_of(old) - held
        stopped = [l.name for l in self._layers if l.params and all(id(p) in left for p in l.params)]
        if stopped:  # (the phase changes here even when each of them was renewed: its steps are a new start)
            # (by name: a fine-tune's new head, put where the old one was, is that layer, and the new optimizer's)
            renewed = {layer.name for model, prefix in self._models for layer in newly_trainable(model, prefix, set(), set())
                       if any(id(p) in held for p in layer.params)}
            names = [name for name in stopped if name not in renewed]
            self._events.append((self._step if since is None else since, "optimizer_stopped", json.dumps(names)))

    def _follow(self, optimizer: torch.optim.Optimizer) -> None:
        """`gw.watch(model, optimizer)`, and `optimizer` replaced by a new one mid-run: the new one
        defines the step from its first step, when the watched one has not stepped since it was made
        (a partner made mid-run beside it then partners it). Left on the old one, every later step
        went unrecorded, silently. Hooked here, in the global pre-hook: its own pre-hook still runs
        in this step() call (torch calls the optimizer's own pre-hooks after the global ones)."""
        self._successor = None
        self._optimizer = optimizer
        self._sharing = {}  # (_shares_weights: with the new one)
        self._meta.update(optimizer_meta(optimizer))
        self._handles.append(optimizer.register_step_pre_hook(lambda opt, a, k: self._before_step(opt)))
        self._handles.append(optimizer.register_step_post_hook(lambda opt, a, k: self._after_step(opt)))

    def guard_skipped(self, optimizer: torch.optim.Optimizer) -> None:
        """gw.guard refused this step (NaN/Inf gradients) without calling the optimizer, so no step
        hook ran. Unlike a loss scaler's skip it is a step with a fault: it is recorded, with its
        non-finite gradients and no update, rather than merged into the next step."""
        if self._mode == "unknown" and self._optimizer is None:
            self.adopt_optimizer(optimizer)
        if optimizer is not self._optimizer or not self._attached:
            return
        self._events.append((self._step, "guard_skipped", "gw.guard: NaN/Inf gradients, step skipped"))
        self._window.close()  # a snapshot left is this one's
        self._close_step()

    def warned(self, message: str, filename: str, lineno: int) -> None:
        """torch warned that a loss's target has another shape than its input (patches.Listener):
        noted once, with both shapes and the script's line (rules/loss_broadcast.py)."""
        if self._broadcast_said or not self._attached or (found := _TARGET_SIZE.search(message)) is None:
            return
        self._broadcast_said = True
        target, given = ([int(x) for x in group.split(",") if x.strip()] for group in found.groups())
        # the script's line (an nn.MSELoss module's warning names torch's loss.py)
        where = caller_line(also=(warnings.__file__,)) or f"{os.path.basename(filename)}:{lineno}"
        detail = {"where": where, "input": given, "target": target}
        self._events.append((self._step, LOSS_BROADCAST, json.dumps(detail)))

    def clipped(self, params: list[torch.Tensor], function: str, limit: object) -> None:
        """The script clipped gradients that the watched optimizer's last step has already used: the
        same gradient tensor, unchanged since (`_consumed`), so the clipping reaches no update, and
        the next backward replaces it. Said once, from the first such call. Not a clip at an
        infinite limit, nor one after a step whose gradients were clipped before it: the norm
        measured (a logging idiom). A gradient a backward, `zero_grad()` or `p.grad = g` changed
        since is not the step's (a second optimizer's clip before its own step, after one backward)."""
        if not self._attached or self._late_clip_said:
            return
        measuring = isinstance(limit, (int, float)) and math.isinf(limit)
        if self._in_step or not self._consumed_by_step(params):  # (in a closure, a step pre-hook: before it)
            if not measuring and any(id(q) in self._seen_params for q in params):  # (a watched weight's)
                self._clipped_before_step = True
                self._note_clipping(function, limit)
            return
        if self._mode != "optimizer" or self._clipped_at_step or measuring:
            return
        self._late_clip_said = True
        detail = {"function": function, "where": caller_line(), "limit": limit if isinstance(limit, (int, float)) else None}
        self._events.append((max(self._step - 1, 0), LATE_CLIP, json.dumps(detail)))

    def _note_clipping(self, function: str, limit: object) -> None:
        """The script's own clipping before the step, kept as a trainer's is (meta `grad_clip`): the
        norms recorded are taken before it, and diagnose does not advise the clipping the run does
        (a tester's LSTM, clipped at 1 in its loop, was told to clip at 1.0)."""
        if "grad_clip" in self._meta or not isinstance(limit, (int, float)):
            return
        what = f"each entry to ±{limit:g}" if "value" in function else f"the total norm to {limit:g}"
        where = caller_line()
        self._meta["grad_clip"] = f"{what} ({function}{f' at {where}' if where else ''})"

    def _consumed_by_step(self, params: list[torch.Tensor]) -> bool:
        if self._consumed is None:
            return False
        param, grad, version = self._consumed
        p, g = param(), grad()
        return p is not None and g is not None and p.grad is g and g._version == version and any(q is p for q in params)

    def _note_consumed(self, optimizer: torch.optim.Optimizer) -> None:
        """One parameter's gradient as the step used it (the tensor, weakly, and its version): a
        clip that finds it unchanged comes after the step. One, not all: O(1) a step."""
        self._clipped_at_step, self._clipped_before_step = self._clipped_before_step, False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._consumed = (weakref.ref(p), weakref.ref(p.grad), p.grad._version)
                    return
        self._consumed = None

    def _unscale(self, values: torch.Tensor) -> torch.Tensor:
        scale = self._backward_scale
        return values if scale is None else torch.where(values >= 0, values / scale, values)

    def _record_grads(self, rec: StepRecord) -> None:
        params = self._params
        if self._dist is not None:  # complete only now, after the all-reduce / reduce-scatter
            grad, grad_max, weight = self._dist.read(params, rec.sampled)
        else:
            grad, grad_max, weight = self._norm_buf, self._max_buf, self._weight_buf
            self._small.read(params, grad, grad_max, weight, rec.sampled)
        rec.grad = self._unscale(grad.clone())
        # a loss scaler syncs at each step anyway (GradScaler reads found_inf): the check is free there
        if (params[0].device.type == "cpu" or self._backward_scale is not None) \
                and not bool(torch.isfinite(rec.grad).all()):
            self._count_non_finite(rec)
        elif rec.nonfinite is not None:
            rec.nonfinite = None
        if rec.sampled:
            rec.grad_max = self._unscale(grad_max.clone())
            rec.weight = weight.clone()
            if self._dist is None and params[0].device.type == "cpu" and not bool(torch.isfinite(rec.weight).all()):
                self._widen_weight_norms(rec)
            if self._mode == "unknown":  # (backward mode: taken before the backward, see _open_backward_window)
                self._window.take(rec)

    def _count_non_finite(self, rec: StepRecord) -> None:
        """Per parameter, the NaN/Inf entries behind a non-finite norm. A norm is also infinite when
        every entry is finite but float32's sum of squares overflows (|g| past ~1e19): a loss
        scaler's scaled gradients get there, since under bf16 autocast nothing overflows and the
        scale keeps doubling. Such a norm is taken again in float64 and is no NaN/Inf finding."""
        rec.nonfinite = {}
        for i in (~torch.isfinite(rec.grad)).nonzero().flatten().tolist():
            g = entries(distributed.local(self._params[i].grad))
            count = int((~torch.isfinite(g)).sum())
            if count:
                rec.nonfinite[i] = count
            else:
                # (a finite norm beyond float32's range is kept at its largest value: finite, as it is)
                rec.grad[i] = self._unscale(torch.linalg.vector_norm(g, dtype=torch.float64)).clamp(max=FLOAT32_MAX)

    def _widen_weight_norms(self, rec: StepRecord) -> None:
        """A weight norm is infinite when every entry is finite but float32's sum of squares
        overflows (|w| past ~1e19): taken again in float64, kept at float32's largest value at most.
        A tester's weights scaled by 1e20 (norm 2.3e20) were told they held NaN/Inf before any update.
        On the CPU, where the test costs no sync."""
        for i in (~torch.isfinite(rec.weight)).nonzero().flatten().tolist():
            w = distributed.local(self._params[i]).detach()
            if bool(torch.isfinite(w).all()):
                rec.weight[i] = torch.linalg.vector_norm(w, dtype=torch.float64).clamp(max=FLOAT32_MAX)

    # ---------------------------------------------------------------- optimizer
    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero-code mode: the first optimizer seen stepping defines the step (until another takes
        over: AutoWatch._other_step)."""
        self._optimizer = optimizer
        self._mode = "optimizer"
        self._meta.update(optimizer_meta(optimizer))
        self._window.close()
        self._stale.disarm()  # (a copy taken as for updates by hand)

    def _say_outside_optimizers(self) -> None:
        """Layers whose weights no optimizer seen stepping holds (or holds only in groups at lr 0)
        get gradients and never change: forgotten, or a backbone frozen on purpose but left
        requires_grad. Said as an event when the set changes; the stalled rule tells them from
        weights that stopped for other reasons."""
        if not self._stepping:
            return
        held = {id(p) for opt, lrs in list(self._stepping.items()) for i, group in enumerate(opt.param_groups)
                if (lrs[i] if i < len(lrs) else group.get("lr", 1)) != 0 for p in group["params"]}
        outside = [l.name for l in self._layers if l.params and not any(id(p) in held for p in l.params)]
        if outside != self._outside:
            self._outside = outside
            self._events.append((self._step, "outside_optimizers", json.dumps(outside)))

    def _seen_stepping(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer` steps now, with these lrs (see `_stepping`)."""
        self._stepping[optimizer] = [group.get("lr", 1) for group in optimizer.param_groups]

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._seen_stepping(optimizer)
        if optimizer is not self._optimizer and self._attached and not hasattr(self, "_partners"):
            self._zero_code_partner(optimizer)
        if optimizer is not self._optimizer or not self._attached:
            return
        self._successor = None  # the watched optimizer steps on: a new one beside it is a partner
        self._partner_runs = {}
        self._stale.settle(optimizer, self._step, self._touched)
        self._window.settle(kept=True)
        self._in_step, self._closure_loss, self._closure_grads, self._reevaluating = True, False, False, False
        rec = self._cur
        self._stop_if_non_finite(rec)
        self._take_window(rec)  # (zero-code: another optimizer may have taken it before its update)

    def _zero_code_partner(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero-code mode calls _before_step for every optimizer, after its _other_step has opened
        the next step's window at another optimizer's step when none was open; right after the
        step optimizer's, the update may be the last step's instead (see UpdateWindow.partner): that
        window is closed again and the update's step told as under gw.watch. No backward is told
        unused there (any optimizer's step uses them), so an update after a backward is the next
        step's, as that backward's loss and gradients are (a GAN's generator)."""
        window = self._window
        if window.late and window.snapshot is not None and window.rec is self._cur:
            window.drop()
        window.partner(optimizer)

    def _shares_weights(self, optimizer: torch.optim.Optimizer) -> bool:
        """`optimizer` holds a weight the watched optimizer holds too (remembered per optimizer)."""
        if id(optimizer) not in self._sharing:
            self._sharing[id(optimizer)] = bool(params_of(optimizer) & params_of(self._optimizer))
        return self._sharing[id(optimizer)]

    def _rival_objective(self) -> None:
        """The gradients of a backward that reached the watched weights were cleared unused, and
        another optimizer stepped after that backward: it trains on a loss computed through this
        model, which is trained on its own loss (a GAN's generator, its loss through the watched
        discriminator). The two play against each other, so this model's loss is not meant to
        fall: an `own_loss` event, as a zero-code run says of a GAN (diagnose then judges no
        loss_plateau or loss_divergence). A discriminator at its equilibrium (loss ~2 ln 2) was
        told its loss had not improved, and to raise its learning rate tenfold."""
        if self._rival is not None and not self._rival_said:
            self._rival_said = True
            self._events.append((self._step, "own_loss", f"{self._rival} trains on a loss of its own "
                                 "through the watched model"))
        self._reached, self._rival = False, None

    def _partner_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Another optimizer steps watched weights (a GAN's discriminator, under a watch on the
        whole module with the generator's optimizer): its update belongs in the step's Δw, which
        is taken from before it. Left out, the layers it trains read as frozen ("give the
        optimizer every parameter")."""
        self._seen_stepping(optimizer)
        if optimizer is not self._optimizer and self._reached and self._attached:
            self._rival = type(optimizer).__name__  # (_rival_objective: if the gradients go unused)
        if self._successor is not None and optimizer is not self._optimizer:
            if self._successor() is optimizer and self._attached:
                return self._follow(optimizer)
        if optimizer is self._optimizer or not self._attached or not self._params:
            return
        if id(optimizer) not in self._partners:  # (_seen_params: the watched weights, by id)
            self._partners[id(optimizer)] = bool(params_of(optimizer) & self._seen_params)
        if self._partners[id(optimizer)] and self._shares_weights(optimizer):
            # stepping twice, with no step of the watched one between, weights the watched one
            # trains too: the next phase's optimizer (made before training began, so not followed
            # from its first step). Left a partner, no later step was recorded, silently. One that
            # trains other weights is a partner however often it steps: a WGAN's critic, 5 steps
            # per generator step under a watch on both models, had taken the step count over
            runs = self._partner_runs.get(id(optimizer), 0) + 1
            self._partner_runs = {id(optimizer): runs}
            if runs >= 2:
                self._say_stopped(self._optimizer, optimizer)
                return self._follow(optimizer)
        if self._partners[id(optimizer)]:
            self._window.partner(optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is not self._optimizer or not self._attached:
            return
        self._note_consumed(optimizer)
        self._close_step()

    def _close_step(self) -> None:
        """An optimizer stepped (or gw.guard refused its step): the step ends. Its update window
        stays open for a partner stepping after it (see UpdateWindow.partner), until it settles."""
        self._stepped = True
        self._in_step = self._reevaluating = False
        self._backward_since_step = False
        self._reached, self._rival = False, None
        self._window.open_late()
        self._check_stale()
        self._touched[:] = [False] * len(self._touched)  # (in place: the hooks hold it)
        self._end_step()

    def _check_stale(self) -> None:
        """End of a step of the watched optimizer (StaleCheck.end_step). Not under DDP/FSDP, whose
        gradients are written by its reducer (docs/statistics.md)."""
        optimizer = self._optimizer
        if optimizer is None or self._mode != "optimizer" or self._dist is not None or not self._params:
            return
        self._stale.end_step(optimizer, self._step, self._params, self._touched, bool(self._cur_sampled))

    def _param_name(self, i: int) -> str:
        """The layer holding the watched parameter at position `i`."""
        for layer in self._layers:
            if i < len(layer.params):
                return layer.name
            i -= len(layer.params)
        return ""

    def _stop_if_non_finite(self, rec: StepRecord | None) -> None:
        """`stop_on=("non_finite",)`: stop before a NaN/Inf gradient or loss reaches the weights
        (before optimizer.step, or before a manual update). Costs one host sync per step."""
        if self._live is None or "non_finite" not in self._live.stop_on or rec is None or rec.grad is None:
            return
        loss_ok = rec.loss_sum is None or bool(torch.isfinite(rec.loss_sum))
        bad = not (loss_ok and bool(torch.isfinite(rec.grad).all()))
        if self._dist is not None:
            bad = self._dist.any_rank(bad)  # all ranks stop together, or none
        if not bad:
            return
        from gradwatch.diagnose import diagnose

        self._end_step(count=False)
        self.flush()
        found = [f for f in diagnose(self.stored_series()) if f.kind == "non_finite"]
        self._live.report(found, self)  # raises TrainingStopped after detaching
        self.detach()
        raise TrainingStopped(f"stopped at step {rec.step}: a non-finite gradient or loss")

    def _lrs(self) -> list[float]:
        if self._optimizer is None:
            return []
        return [float(g["lr"]) for g in self._optimizer.param_groups if "lr" in g]

    def _end_step(self, count: bool = True) -> None:
        rec = self._cur
        if rec is not None:
            rec.finish(self._lrs())
            self._pending.append(rec)
        self._cur = None
        if count:
            self._step += 1
            if self._step - 1 != self._unordered:  # (else the next forward numbers the layers)
                self._order.settle(self._layers, self._params)
        self._cur_sampled = self._sampled(self._step) if self._recorded(self._step) else None
        self._clear_grad_buffers()
        self._sampled_hooks.disarm()
        if count and self._cur_sampled and self._attached:
            self._sampled_hooks.arm(self._layers)
        if self._new_params_due or len(self._pending) >= self.flush_every or (count and self._unfrozen()):
            self._new_params_due = False
            self._watch_new_params()
            self.flush()

    def _clear_grad_buffers(self) -> None:
        """Mark every parameter as having no gradient yet in this step (max |g| and weight norms
        are taken on sampled steps only)."""
        self._small.clear()
        if self._norm_buf is not None:
            self._norm_buf.fill_(MISSING)
            if self._cur_sampled:
                self._max_buf.fill_(MISSING)
                self._weight_buf.fill_(MISSING)


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int = 1,
    sample_every: int = 10,
    flush_every: int = 50,
    out: str | os.PathLike | None = None,
    on_finding: Callable | None = None,
    stop_on: Iterable[str] = (),
    warn: bool = True,
    all_ranks: bool = False,
    status: bool | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
) -> Watch:
    """Start watching `model` (and `optimizer`, whose steps then define the step count).

    `every`: record every N-th step; `sample_every`: take the costlier statistics every N-th step;
    `flush_every`: write to the store every N recorded steps; `out`: a run directory (or a
    .sqlite file) for the store, or None to keep it in memory. Findings are diagnosed live at
    flushes: `warn` prints each new (kind, layers) once, `on_finding(finding)` is called for it,
    and a kind in `stop_on` raises `TrainingStopped` (for "non_finite", before the bad step
    reaches the weights). A DDP/FSDP model is watched exactly across ranks (docs/distributed.md):
    rank 0 writes the store, every rank with `all_ranks=True`. `status`: a live status line on
    stderr (default: when it is a terminal); `tensorboard_dir`: also write TensorBoard scalars
    there at each flush.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"watch() needs a torch.nn.Module, got {type(model).__name__}; pass the model itself")
    return Watch(model, optimizer, every=every, sample_every=sample_every, flush_every=flush_every, out=out,
                 on_finding=on_finding, stop_on=stop_on, warn=warn, all_ranks=all_ranks, status=status,
                 tensorboard_dir=tensorboard_dir)


def _detach_at_exit(ref: weakref.ref) -> None:
    """At interpreter exit (also after an uncaught error): the steps since the last flush stored.
    Under DDP/FSDP the exchange's own exit handler makes that flush (collect/distributed.py)."""
    watch = ref()
    if watch is not None and watch._dist is None:
        store_last_steps(watch)
