"""The hooks of a sampled step: activation statistics, ∂L/∂(layer output) and recurrent time
profiles. They exist only while a sampled step runs (`arm` at its start, `disarm` at its end):
a hook on every module, every step, would cost more than everything else recorded."""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from typing import Callable

import torch
from torch.nn.utils.rnn import PackedSequence
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from gradwatch.collect import functional_acts, patches
from gradwatch.collect.layers import RECURRENT, Layer, compiled_inner
from gradwatch.collect.record import StepRecord
from gradwatch.collect.stats import activation_stats, activation_stats_stacked, rms, time_profile, unit_axis, unit_dim
from gradwatch.collect.unsaved import Unsaved

# An activation output of at most this many entries costs more in kernel launches (~10 per output,
# ~90 µs together on the CPU) than in reading it again: it is copied at its forward and its
# statistics are taken with those of every output of its shape, when a backward first needs one
SMALL_OUTPUT = 4096
# Sampled steps whose loss's graph is searched for activations called as functions (F.relu in
# forward()), from the first one after the layers change: a forward's path is the same each step,
# and each search walks every node of the graph once
LOOKS = 3


def _eager(hook: Callable) -> Callable:
    """A module hook torch.compile calls instead of tracing it (traced, its reads of the step's
    record became guards, recompiled per layer until dynamo gave up). Only once torch.compile is
    in use: `torch.compiler.disable` would import it (~2 s) into every watched process."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo.disable(hook) if dynamo is not None else hook


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@functools.cache
def quiet_global_hook_warning() -> None:
    """torch warns that a compiled model's wrapper fires global module hooks once more: those are
    gradwatch's own (zero-code discovery, the wrapper finder), which take the wrapper for what it
    is. Set once: each call would reset the warnings cache."""
    warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")


class _Stats:
    """An output's activation statistics: a large one's taken at its forward; a small one's copied
    then (a later in-place op must not change them) and taken when first asked, together with every
    output copied since that is still pending (`todo`, shared). The copy is this object's own and
    `todo` refers to it weakly: a forward no backward follows (a validation pass left with gradients
    on) frees its copies with its graph, as the output's gradient hook, their only holder, goes.
    Held in `todo`, 1000 such forwards kept 156 MiB of copies to the next backward, which took their
    statistics for nothing (537 ms), and a cycle through `todo` kept them from a gc-less process."""

    def __init__(self, y: torch.Tensor, activation: str, todo: list, unit: int) -> None:
        self.stats: torch.Tensor | None = None
        self.copy: torch.Tensor | None = None
        self.activation = activation
        self.unit = unit  # the units' axis (`stats.unit_axis`), read from y's graph at its forward
        self._todo = todo
        if _small(y):
            self.copy = y.detach().to(torch.float32, copy=True)
            todo.append(weakref.ref(self))
            if len(todo) >= PRUNE_AT and len(todo) & (len(todo) - 1) == 0:  # at each doubling: amortised
                todo[:] = [r for r in todo if (p := r()) is not None and p.stats is None]
        else:
            self.stats = activation_stats(y, activation, unit)

    def value(self) -> torch.Tensor:
        if self.stats is None:
            _take_together(self._todo)
        return self.stats


PRUNE_AT = 1024  # pending references dropped once dead, from this many on


def _leaf(module: nn.Module) -> bool:
    """A module with no children but its parametrizations (a Linear, a Conv, a norm): its output is
    one layer's. A block's or a model's root's is the model's output, which the loss may take through
    a sigmoid of its own."""
    return all(name == "parametrizations" for name, _ in module.named_children())


def _small(y: torch.Tensor) -> bool:
    """On the CPU only, where each row of the stacked pass is tested bitwise the output's alone."""
    return y.numel() <= SMALL_OUTPUT and y.device.type == "cpu" and y.is_contiguous()


def _take_together(todo: list) -> None:
    """Each pending output's statistics (those still alive), in one stacked pass per (shape, activation)."""
    groups: dict[tuple, list] = {}
    for ref in todo:
        pending = ref()
        if pending is not None and pending.stats is None:
            groups.setdefault((pending.copy.shape, pending.activation, pending.unit), []).append(pending)
    todo.clear()
    for (_, activation, unit), items in groups.items():
        rows = activation_stats_stacked(torch.stack([p.copy for p in items]), activation, unit).unbind(0)
        for pending, row in zip(items, rows):
            pending.stats, pending.copy = row, None


def _graph_task() -> int:
    """The running backward pass's id (torch's graph task), -1 where torch does not say."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return int(current()) if current is not None else -1


class _SampledStep(TorchFunctionMode):
    """Active around a compiled model's forward on sampled steps, and changing nothing. torch.compile
    guards on the stack of these modes, so the code it compiles for a sampled step (broken into a
    graph per module at the hooks, with no guard of its own on them) is kept apart from the whole
    graph the other steps run. Without it, that broken code served every later step (1.37x)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class SampledHooks:
    """`current()`: the record of the step running (None: not recorded); `unscale(values)`:
    values of a gradient taken under a loss scale, as without it; `counted()`: the backward
    running is the step's (not a closure called again at a line-search point)."""

    def __init__(self, current: Callable[[], StepRecord | None],
                 unscale: Callable[[torch.Tensor], torch.Tensor],
                 counted: Callable[[], bool] = lambda: True,
                 derivative_seen: Callable[[], None] = lambda: None) -> None:
        self._current = current
        self._unscale = unscale
        self._counted_here = counted
        self._derivative_seen = derivative_seen
        self._passes_of: StepRecord | None = None  # the step whose derivative passes `_passes` holds
        self._passes: set[int] = set()  # their autograd graph tasks
        self._handles: list = []
        self._compiled: list[nn.Module] = []  # torch.compile wrappers of watched models
        self._others: set[int] = set()  # ids of wrappers of models not watched
        self._modes: list[_SampledStep] = []
        self._pre_hooks: dict[int, Callable] = {}  # id(recurrent module): its armed input hook
        # the hooks made for earlier samples, reused: making one for torch.compile (`_eager`) left
        # cyclic garbage, and 2000 layers' cost 20-180 ms a sample (the collector's full passes)
        self._made: dict[tuple, Callable] = {}
        self._todo: list = []  # small outputs whose statistics are still to take (`_Stats`)
        self._layers: list[Layer] = []
        self._looks_left = 0  # sampled steps still to search for functional activations (`LOOKS`)
        self._produced: dict[int, tuple[int, str]] = {}  # id(a layer output's grad_fn): (position, its class)
        self._module_outputs: dict[int, int] = {}  # ids of activation modules' output nodes: their position
        self._recurrent_outputs: set[int] = set()  # ids of recurrent layers' output nodes
        # the activations the loss takes through no weight layer (`functional_acts.reaching_output`):
        # the output's own, a head's too that another head runs after (the run's meta)
        self.output_layers: set[str] = set()
        self._looked_in = 0  # id of the step record whose graphs are being searched

    def _counted(self) -> bool:
        """The gradient arriving is the step's loss's. Not torch.autograd.grad's with create_graph,
        outside any loss's backward (its hooks run with grad mode on): a derivative inside the loss,
        a PINN's ∂u/∂x or a gradient penalty's, whose du/dh (1e-8 to 2) was averaged in for a PINN's
        ∂L/∂h (~1e-10). Two or more such passes in a step are noted (`derivative_seen`): a derivative
        of a derivative, a PINN's u''. One alone (WGAN-GP's dD/dx) needs no smooth activation."""
        if torch.is_grad_enabled() and not patches.backward_running():
            rec = self._current()
            if rec is not self._passes_of:
                self._passes_of, self._passes = rec, set()
            self._passes.add(_graph_task())
            if len(self._passes) >= 2:
                self._derivative_seen()
            return False
        return self._counted_here()

    def add_compiled(self, wrapper: nn.Module) -> None:
        if any(w is wrapper for w in self._compiled):
            return
        self._compiled.append(wrapper)
        if self._handles:
            self._hook_wrapper(wrapper)

    def entered(self, wrapper: nn.Module) -> None:
        """Called from a forward pre-hook of the wrapper's own call (zero-code discovery, the
        wrapper finder), which its first compile follows: hooked too late for its own pre-hook to
        run this time, a sampled step enters the mode here."""
        if self._handles:
            self._enter(wrapper, ())

    def _hook_wrapper(self, wrapper: nn.Module) -> None:
        """(Hooks on the wrapper run outside the compiled code; the exit runs even if it raises.)"""
        self._handles.append(wrapper.register_forward_pre_hook(Unsaved(self._enter)))
        self._handles.append(wrapper.register_forward_hook(Unsaved(self._exit), always_call=True))

    def _wrapper_finder(self, layers: list[Layer]):
        """`gw.watch(model)` with `torch.compile(model)` called: the wrapper is found at its call on
        a sampled step, by a global hook that is there on sampled steps only, and entered at once."""
        inside = {id(layer.module) for layer in layers}
        quiet_global_hook_warning()

        def find(module, args) -> None:
            inner = compiled_inner(module)
            if inner is None or id(module) in self._others or any(w is module for w in self._compiled):
                return
            if not any(id(m) in inside for m in inner.modules()):
                self._others.add(id(module))
                return
            self.add_compiled(module)
            self.entered(module)
        return register_module_forward_pre_hook(find)

    def _enter(self, module, args) -> None:
        mode = _SampledStep()
        mode.__enter__()
        self._modes.append(mode)

    def _exit(self, module, args, output) -> None:
        if self._modes:
            self._modes.pop().__exit__(None, None, None)

    def arm(self, layers: list[Layer]) -> None:
        if self._handles:
            return
        if [id(l) for l in layers] != [id(l) for l in self._layers]:  # (another set: a thread's handed over)
            self._looks_left = LOOKS
            self._produced, self._module_outputs, self._recurrent_outputs = {}, {}, set()
        self._layers = list(layers)
        patches.compile_sees_hooks()
        for wrapper in self._compiled:
            self._hook_wrapper(wrapper)
        eager = "torch._dynamo" in sys.modules  # (a hook made before it was imported is not for compile)
        if eager:
            self._handles.append(self._wrapper_finder(layers))
        for pos, layer in enumerate(layers):
            module = layer.module
            if layer.role == "activation":
                hook = self._made_hook(("act", pos, layer.activation, eager), self._activation_hook)
            elif layer.role == "recurrent" and layer.activation:
                hook = self._made_hook(("rec", pos, layer.activation, eager), self._recurrent_output_hook)
            elif layer.activation:  # a weight layer whose output an F.relu in forward() takes
                hook = self._made_hook(("fun", pos, layer.activation, eager), self._functional_hook)
            else:
                hook = self._made_hook(("out", pos, eager), self._output_grad_hook)
            self._handles.append(module.register_forward_hook(hook))
            if isinstance(module, RECURRENT):
                self._pre_hooks[id(module)] = self._made_hook(("rnn", pos, module.batch_first, eager),
                                                              self._recurrent_input_hook)
                self._handles.append(module.register_forward_pre_hook(self._pre_hooks[id(module)]))

    def _made_hook(self, key: tuple, make: Callable) -> Callable:
        """The hook `make(*key[1:-1])` made for an earlier sample, else a new one."""
        hook = self._made.get(key)
        if hook is None:
            hook = self._made[key] = Unsaved(make(*key[1:-1]))
        return hook

    def run_pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """Zero-code discovery arms a module's hooks from inside its own call, after torch took the
        list of its pre-hooks for this call: an RNN called directly as the model lost its time
        profile at step 0 (the blow-up of an exploding RNN starts there). Run it now; its result
        replaces the args, as a pre-hook's does."""
        hook = self._pre_hooks.get(id(module))
        return hook(module, args) if hook is not None else None

    def disarm(self) -> None:
        if not self._handles or not self._looks_left:  # (a sampled step's outputs are kept one step
            # more: a GAN's G makes its fake in D's step and runs its backward in the next one)
            self._produced, self._module_outputs, self._recurrent_outputs = {}, {}, set()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pre_hooks = {}
        self._todo = []  # (an output a late backward still reaches keeps the list it is in)

    def _hook_output_grad(self, rec: StepRecord, pos: int, y: torch.Tensor | None,
                          act: _Stats | None = None) -> None:
        """`act`: the output's activation statistics, counted when a backward reaches it."""
        if y is None or not y.requires_grad or y.numel() == 0:
            return

        def on_grad(g: torch.Tensor) -> None:
            if not self._counted():
                return
            value = self._unscale(rms(g))
            # (kept 0-d, as rms gives it: the flush stacks them; a scale with a dim would give it one)
            rec.accumulate(rec.out_rms, pos, value.reshape(()) if value.dim() else value)
            if act is not None:
                rec.accumulate(rec.act, pos, act.value())

        y.register_hook(on_grad)

    def _activation_hook(self, pos: int, activation: str):
        def hook(module, args, output):
            rec = self._current() if torch.is_grad_enabled() else None
            y = _first_tensor(output)
            if self._looks_left and y is not None and y.grad_fn is not None:
                self._module_outputs[id(y.grad_fn)] = pos  # (an empty one too: not a functional call's)
            # an empty output (a mixture-of-experts' expert given no token) has no statistics:
            # its mean would be NaN, stored as measured non-finite
            if rec is None or y is None or not y.is_floating_point() or y.numel() == 0:
                return
            if y.requires_grad:
                # counted when a backward reaches the output: a forward no backward uses (a
                # validation pass left with gradients on, between steps) is not the training's
                self._hook_output_grad(rec, pos, y, _Stats(y, activation, self._todo, unit_axis(y)))
            else:  # (no backward can reach it: a frozen backbone's, a model fed inputs without a graph)
                rec.accumulate(rec.act, pos, activation_stats(y, activation))
        return _eager(hook)

    def _recurrent_output_hook(self, pos: int, activation: str):
        """A recurrent layer's output sequence, read as its nonlinearity's activations (saturated,
        dead units); counted when a backward reaches the sequence or the last state (`h_n`: a
        classifier on `h[-1]` leaves the sequence unused)."""
        def hook(module, args, output):
            rec = self._current() if torch.is_grad_enabled() else None
            first = output[0] if isinstance(output, tuple) and output else output
            y = first.data if isinstance(first, PackedSequence) else _first_tensor(output)  # (packed: its rows)
            if rec is None or y is None or not y.is_floating_point() or y.numel() == 0:
                return
            if self._looks_left and y.grad_fn is not None:
                self._recurrent_outputs.add(id(y.grad_fn))
            unit = unit_dim(y.dim())  # (a sequence's units are its last axis)
            if not y.requires_grad:
                rec.accumulate(rec.act, pos, activation_stats(y, activation, unit))
                return
            stats = _Stats(y, activation, self._todo, unit)
            self._hook_output_grad(rec, pos, y, stats)
            state = _first_tensor(output[1]) if isinstance(output, tuple) and len(output) > 1 else None
            if state is not None and state.requires_grad:
                def on_state_grad(g: torch.Tensor) -> None:
                    if self._counted():  # (the mean of the counts: both reached, the same value twice)
                        rec.accumulate(rec.act, pos, stats.value())
                state.register_hook(on_state_grad)
        return _eager(hook)

    def _output_grad_hook(self, pos: int):
        def hook(module, args, output):
            rec = self._current() if torch.is_grad_enabled() else None
            if rec is None:
                return
            y = _first_tensor(output)
            if self._looks_left and y is not None and y.grad_fn is not None:
                self._produced[id(y.grad_fn)] = (pos, type(y.grad_fn).__name__)
            self._hook_output_grad(rec, pos, y)
        return _eager(hook)

    def _functional_hook(self, pos: int, activation: str):
        """A weight layer's output, and the statistics of the activation forward() applies to it as
        a function (`functional_acts`), taken from the output: the activation's own is not in reach."""
        apply = functional_acts.APPLY[activation]

        def hook(module, args, output):
            rec = self._current() if torch.is_grad_enabled() else None
            y = _first_tensor(output)
            if rec is None or y is None or not y.is_floating_point() or y.numel() == 0:
                return
            if self._looks_left and y.grad_fn is not None:  # (a weight layer's output: `reaching_output` stops)
                self._produced[id(y.grad_fn)] = (pos, type(y.grad_fn).__name__)
            with torch.no_grad():
                a = apply(y)
            self._hook_output_grad(rec, pos, y, _Stats(a, activation, self._todo, unit_axis(y)))
        return _eager(hook)

    def before_backward(self, roots: object) -> None:
        """On the first sampled steps (and the step after each): the activations forward() calls as
        functions on a layer's output, found in the loss's graph before its backward frees it. The
        layer takes their name (the store's `activation` of a weight layer) and, on a sampled step,
        this step's statistics; its hook takes them from the next sampled step on."""
        if not self._looks_left or not self._produced:
            return
        rec = self._current()
        if rec is not None and not self._counted_here():
            return
        if id(rec) != self._looked_in:  # (each backward of the step is searched: a GAN's D's, then G's)
            self._looked_in = id(rec)
            self._looks_left -= 1
        for pos in functional_acts.reaching_output(roots, self._produced, self._module_outputs, self._recurrent_outputs):
            if pos < len(self._layers):
                self.output_layers.add(self._layers[pos].name)
        found, outputs = functional_acts.find(roots, self._produced, self._module_outputs)
        sampled = bool(self._handles) and rec is not None  # (else found only: the statistics are a sampled step's)
        for pos, calls in found.items():
            layer = self._layers[pos] if pos < len(self._layers) else None
            names = {act for act, _, _ in calls}
            if layer is None or layer.role != "param" or layer.activation or len(names) != 1 or not _leaf(layer.module) \
                    or len(calls) != outputs.get(pos, 0) \
                    or not all(functional_acts.made_from(source, layer.params) for _, _, source in calls):
                continue  # (every output of the layer through it, each the layer's own)
            layer.activation = names.pop()
            for _, out, _ in calls if sampled else ():
                if out.numel():  # (an empty output has no statistics: its mean is NaN)
                    # (the units' axis from the graph, which a detached tensor has not: a Conv1d's channels)
                    rec.accumulate(rec.act, pos, activation_stats(out.detach(), layer.activation, unit_axis(out)))

    def _recurrent_input_hook(self, pos: int, batch_first: bool):
        """Make the sequence input's gradient visible: ∂L/∂x_t for each t shows how far back in
        time the loss still reaches (it decays geometrically when gradients vanish through time)."""
        def hook(module, args):
            rec = self._current() if torch.is_grad_enabled() else None
            if rec is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if not x.is_floating_point() or x.numel() == 0:
                return None
            replaced = not x.requires_grad
            if replaced:
                x = x.detach().requires_grad_()
            time_dim = 1 if (batch_first and x.dim() == 3) else 0

            def on_grad(g: torch.Tensor) -> None:
                if not self._counted():
                    return
                profile = time_profile(g, time_dim)
                rec.profiles[pos] = self._unscale(profile)

            x.register_hook(on_grad)
            return (x, *args[1:]) if replaced else None
        return _eager(hook)
