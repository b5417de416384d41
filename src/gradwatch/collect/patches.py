"""The few global entry points every training loop goes through, patched while a Watch is attached.

`torch.autograd.backward` (which `Tensor.backward` calls) tells us a backward pass ended and which
tensor it started from (the loss), and that one is running; `GradScaler.scale` tells us that loss was multiplied by the loss
scale, so gradients can be divided back; `GradScaler.update` tells us an iteration ended, so a step
the scaler skipped (inf/NaN from the scaled loss) is seen as skipped, not as an alarm;
`Optimizer.add_param_group` (which every optimizer's constructor calls) tells us which parameters
are about to train, before the model they belong to first runs; torch's gradient clipping
(`clip_grad_norm_`, `clip_grad_value_`, `clip_grads_with_norm_`) tells us when a script clips, so
clipping called after the step it was meant for is seen; `warnings.showwarning` tells us what torch
warned of (a loss whose target broadcasts against its input). And `gw.guard`, which skips a non-finite
step without calling the optimizer (so no step hook runs), says so through `guard_skipped`.
Patches are installed with the first attached Watch and removed with the last.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Protocol

import torch


class Listener(Protocol):
    def before_backward(self, root: object) -> None: ...
    def after_backward(self, root: object) -> None: ...
    def after_scaler_update(self) -> None: ...
    def params_added(self, optimizer: torch.optim.Optimizer) -> None: ...
    def guard_skipped(self, optimizer: torch.optim.Optimizer) -> None: ...
    def clipped(self, params: list[torch.Tensor], function: str, limit: object) -> None: ...
    def warned(self, message: str, filename: str, lineno: int) -> None: ...


_listeners: list[Listener] = []
_originals: dict[str, object] = {}

UNSCALED = "_gradwatch_unscaled"  # attribute set on GradScaler.scale()'s output: (loss, scale)


_backwards = [0]  # torch.autograd.backward calls running (a loss's backward)
_partial = [False]  # the running one was given `inputs=`: it fills some gradients only


def partial_backward() -> bool:
    """The backward running was given `inputs=` (`loss.backward(inputs=head)`): two of them on one
    loss may fill disjoint parameters, no gradient twice."""
    return _partial[0]


def backward_running() -> bool:
    """A loss's backward (torch.autograd.backward, which Tensor.backward calls) is running: a
    gradient hook fired outside one, with grad mode on, is torch.autograd.grad's with create_graph."""
    return _backwards[0] > 0


def _backward(original, tensors, *args, **kwargs):
    _partial[0] = kwargs.get("inputs") is not None or len(args) >= 5 and args[4] is not None
    for listener in list(_listeners):
        listener.before_backward(tensors)
    _backwards[0] += 1
    try:
        result = original(tensors, *args, **kwargs)
    finally:
        _backwards[0] -= 1
    for listener in list(_listeners):
        listener.after_backward(tensors)
    return result


def _scale(original, self, outputs):
    scaled = original(self, outputs)
    if isinstance(scaled, torch.Tensor) and scaled is not outputs and self._scale is not None:
        setattr(scaled, UNSCALED, (outputs.detach(), self._scale.detach().clone()))
    return scaled


def _update(original, self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    for listener in list(_listeners):
        listener.after_scaler_update()
    return result


def _add_param_group(original, self, param_group):
    result = original(self, param_group)
    for listener in list(_listeners):
        listener.params_added(self)
    return result


CLIPPERS = ("clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_")
_clippers: list[tuple[object, str, object, object]] = []  # (module, name, torch's function, its wrapper)


def importers(function) -> list:
    """Modules outside torch holding `function` as a global of its own name: the script and its
    helpers, after `from torch.distributed import destroy_process_group` (or `from torch.nn.utils
    import clip_grad_norm_`), which bound torch's function before any patch."""
    name = function.__name__
    found = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] == "torch":
            continue
        try:
            if vars(module).get(name) is function:
                found.append(module)
        except TypeError:  # (a module-like object without __dict__)
            continue
    return found


def _clip(original, name, parameters, *args, **kwargs):
    """Listeners see the parameters first; an iterable (`model.parameters()`, a generator) is read
    once into a list, which torch takes as it takes the iterable."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    limit = args[0] if args else kwargs.get("max_norm", kwargs.get("clip_value"))
    for listener in list(_listeners):
        listener.clipped(params, name, limit)
    return original(parameters if isinstance(parameters, torch.Tensor) else params, *args, **kwargs)


def _showwarning(message, category, filename, lineno, file=None, line=None):
    """Listeners read the warning shown; then it is shown as it would have been (the function it
    replaced, the user's own or the default)."""
    for listener in list(_listeners):
        listener.warned(str(message), filename, lineno)
    return _originals["showwarning"](message, category, filename, lineno, file, line)


def guard_skipped(optimizer: torch.optim.Optimizer) -> None:
    """gw.guard skipped `optimizer`'s step: tell every attached listener."""
    for listener in list(_listeners):
        listener.guard_skipped(optimizer)


def add(listener: Listener) -> None:
    if not _listeners:
        _install()
    _listeners.append(listener)


def remove(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)
    if not _listeners:
        _uninstall()


def _install() -> None:
    scaler = torch.amp.GradScaler
    _originals["backward"] = torch.autograd.backward
    _originals["scale"] = scaler.scale
    _originals["update"] = scaler.update
    _originals["add_param_group"] = torch.optim.Optimizer.add_param_group
    _originals["showwarning"] = warnings.showwarning
    warnings.showwarning = _showwarning
    torch.autograd.backward = functools.wraps(torch.autograd.backward)(
        functools.partial(_backward, _originals["backward"])
    )
    scaler.scale = functools.wraps(scaler.scale)(lambda self, outputs: _scale(_originals["scale"], self, outputs))
    scaler.update = functools.wraps(scaler.update)(
        lambda self, *a, **k: _update(_originals["update"], self, *a, **k)
    )
    torch.optim.Optimizer.add_param_group = functools.wraps(torch.optim.Optimizer.add_param_group)(
        lambda self, group: _add_param_group(_originals["add_param_group"], self, group)
    )
    for name in CLIPPERS:  # torch's two names for each, and a script's `from torch.nn.utils import ...`
        original = getattr(torch.nn.utils.clip_grad, name, None)
        held = [torch.nn.utils, torch.nn.utils.clip_grad, *(importers(original) if original is not None else ())]
        wrappers: dict[int, object] = {}
        for module in held:
            # each name's own function wrapped (a script or library may have put its own there)
            if (function := getattr(module, name, None)) is None:
                continue
            if id(function) not in wrappers:
                wrappers[id(function)] = functools.wraps(function)(functools.partial(_clip, function, name))
            _clippers.append((module, name, function, wrappers[id(function)]))
            setattr(module, name, wrappers[id(function)])


def compile_sees_hooks() -> None:
    """torch.compile does not guard on module hooks (`skip_nnmodule_hook_guards`): code compiled
    while the sampled-step hooks were off (a new batch shape on an unsampled step) would never call
    them again, and a compiled model's activation statistics stopped for good. With the guard, the
    two variants are compiled once each. Set only once torch.compile is in use (importing it costs
    ~2 s); the last watch to detach puts the setting back. Numerics are untouched."""
    config = sys.modules.get("torch._dynamo.config")
    if config is not None and config.skip_nnmodule_hook_guards and _listeners:
        _originals.setdefault("hook_guards", config)
        config.skip_nnmodule_hook_guards = False


def _uninstall() -> None:
    config = _originals.pop("hook_guards", None)
    if config is not None:
        config.skip_nnmodule_hook_guards = True
    if not _originals:
        return
    torch.autograd.backward = _originals.pop("backward")
    torch.amp.GradScaler.scale = _originals.pop("scale")
    torch.amp.GradScaler.update = _originals.pop("update")
    torch.optim.Optimizer.add_param_group = _originals.pop("add_param_group")
    shown = _originals.pop("showwarning")
    if warnings.showwarning is _showwarning:  # (unless something replaced it since: pytest, logging)
        warnings.showwarning = shown
    for module, name, original, wrapper in _clippers:
        if getattr(module, name, None) is wrapper:  # (unless the script rebound the name since)
            setattr(module, name, original)
    _clippers.clear()
