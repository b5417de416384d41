"""An activation called as a function in forward() (`torch.sigmoid(self.fc1(x))`), swapped without
editing forward(): no module holds it, so `swap_activations` has nothing to replace. `gradwatch
fix` tries the swap this way; the change to make by hand is the one line of forward()."""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradwatch.collect.unsaved import Unsaved
from gradwatch.errors import ConfigError
from gradwatch.remedies._common import forward_once
from gradwatch.remedies._activations import reaching_output
from gradwatch.remedies.modify import LAYERS, Change

# The calls of each function forward() may make (F.relu passes itself to the mode, then torch.relu).
CALLS = {
    "relu": (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_),
    "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, torch.Tensor.sigmoid_, torch.sigmoid_),
    "tanh": (torch.tanh, torch.Tensor.tanh, F.tanh, torch.Tensor.tanh_, torch.tanh_),
}
NEW = {"leaky_relu": lambda x, inplace: F.leaky_relu(x, 0.01, inplace=inplace),
       "silu": lambda x, inplace: F.silu(x, inplace=inplace)}


class _Swapped(TorchFunctionMode):
    """Inside the model's forward: a call of `old` on the output of a layer in `layers` made `new`'s."""

    def __init__(self, calls: tuple, new, outputs: dict[int, weakref.ref]):
        super().__init__()
        self.calls, self.new, self.outputs, self.swapped = calls, new, outputs, 0
        self._depth = 0  # (the model called inside its own forward: entered once)

    def enter(self, module, args) -> None:
        self._depth += 1
        if self._depth == 1:
            self.outputs.clear()
            self.__enter__()

    def exit(self, module, args, output) -> None:
        if not self._depth:  # (hooked from inside a call, whose pre-hooks had run: fix's first forward)
            return
        self._depth -= 1
        if self._depth == 0:
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.calls and args and isinstance(args[0], torch.Tensor):
            ref = self.outputs.get(id(args[0]))
            if ref is not None and ref() is args[0]:
                self.swapped += 1
                inplace = bool(kwargs.get("inplace")) or getattr(func, "__name__", "").endswith("_")
                return self.new(args[0], inplace)
        return func(*args, **kwargs)


def swap_functions(model: nn.Module, old: str = "sigmoid", new: str = "leaky_relu", *, example_input: Any,
                   keep_output: bool = True, inside_call: bool = False) -> tuple[nn.Module, Change]:
    """Make every call of `old` ("relu", "sigmoid", "tanh") that forward() applies to a layer's own
    output (a Linear's, a Conv's, a norm's) call `new` ("leaky_relu", slope 0.01, or "silu"): hooks on
    the model and its leaf layers, in place, for as long as the model lives. `keep_output`: not on the
    output of the last layer to run, nor where the call's result reaches the model's output through
    no Linear/Conv (a sigmoid giving BCELoss its probabilities, also a head's that another head runs
    after). `example_input` (a batch the model takes) finds the layers and checks that a call was
    swapped. `inside_call`: called from a forward pre-hook of the model's (gradwatch fix's trial),
    whose call then runs on with the swap too: its own pre-hooks were taken before these were added."""
    if old not in CALLS or new not in NEW:
        raise ConfigError(f"swap_functions swaps {', '.join(CALLS)} for {', '.join(NEW)}; got {old!r} -> {new!r}")
    leaves = [(name, m) for name, m in model.named_modules()
              if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))]
    ran: list[str] = []
    looks = [m.register_forward_hook(lambda m, a, o, name=name: ran.append(name)) for name, m in leaves]
    try:
        forward_once(model, example_input)
    finally:
        for h in looks:
            h.remove()
    kept = set()
    if keep_output and ran:  # the last layer's, and any other whose result reaches the output through no layer
        kept = {ran[-1]} | reaching_output(model, example_input, LAYERS, functions=CALLS[old])
    hidden = {name for name, _ in leaves if name in ran and name not in kept}
    outputs: dict[int, weakref.ref] = {}
    mode = _Swapped(CALLS[old], NEW[new], outputs)
    # (pickled or deep-copied, the model's hooks are inert: `torch.save(model)` saves it; a copy runs `old`)
    handles = [m.register_forward_hook(Unsaved(_marker(outputs))) for name, m in leaves if name in hidden]
    handles.append(model.register_forward_pre_hook(Unsaved(mode.enter)))
    handles.append(model.register_forward_hook(Unsaved(mode.exit), always_call=True))
    forward_once(model, example_input)
    if not mode.swapped:
        for h in handles:
            h.remove()
        return model, Change(f"no {old} called as a function on a hidden layer's output; nothing changed")
    if inside_call:
        mode.enter(model, ())  # (left by the forward hook at the end of the call)
    layers = sorted(hidden, key=ran.index)
    return model, Change(f"{old} called in forward() on the outputs of {', '.join(layers)} made {new}", layers)


def _marker(outputs: dict[int, weakref.ref]):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            outputs[id(output)] = weakref.ref(output)
    return hook
