"""The few global entry points every training loop goes through, patched while a Watch is attached.

`torch.autograd.backward` (which `Tensor.backward` calls) tells us a backward pass ended and which
tensor it started from (the loss); `GradScaler.scale` tells us that loss was multiplied by the loss
scale, so gradients can be divided back; `GradScaler.update` tells us an iteration ended, so a step
the scaler skipped (inf/NaN from the scaled loss) is seen as skipped, not as an alarm. And
`gw.guard`, which skips a non-finite step without calling the optimizer (so no step hook runs),
says so through `guard_skipped`.
Patches are installed with the first attached Watch and removed with the last.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch


class Listener(Protocol):
    def before_backward(self, root: object) -> None: ...
    def after_backward(self, root: object) -> None: ...
    def after_scaler_update(self) -> None: ...
    def guard_skipped(self, optimizer: torch.optim.Optimizer) -> None: ...


_listeners: list[Listener] = []
_originals: dict[str, object] = {}

UNSCALED = "_gradwatch_unscaled"  # attribute set on GradScaler.scale()'s output: (loss, scale)


def _backward(original, tensors, *args, **kwargs):
    for listener in list(_listeners):
        listener.before_backward(tensors)
    result = original(tensors, *args, **kwargs)
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
    torch.autograd.backward = functools.wraps(torch.autograd.backward)(
        functools.partial(_backward, _originals["backward"])
    )
    scaler.scale = functools.wraps(scaler.scale)(lambda self, outputs: _scale(_originals["scale"], self, outputs))
    scaler.update = functools.wraps(scaler.update)(
        lambda self, *a, **k: _update(_originals["update"], self, *a, **k)
    )


def _uninstall() -> None:
    if not _originals:
        return
    torch.autograd.backward = _originals.pop("backward")
    torch.amp.GradScaler.scale = _originals.pop("scale")
    torch.amp.GradScaler.update = _originals.pop("update")
