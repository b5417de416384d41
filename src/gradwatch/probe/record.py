"""One recorded forward pass: which layers ran, in what order, with which input and output tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from gradwatch.collect.layers import RECURRENT, Layer, discover


def first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        return first_tensor(list(obj.values()))
    return None


@dataclass
class Call:
    """One forward call of a watched module."""

    name: str
    module: nn.Module
    role: str  # "param" | "activation" | "recurrent" | "cell"
    activation: str
    params: list[nn.Parameter]
    args: tuple = ()
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None
    raw_out: Any = None
    acts: list["Call"] = field(default_factory=list)  # activation calls that follow a param call


class Recorder:
    """Forward pre/post hooks on every layer of `model` (collect.layers' notion of a layer) while in
    the `with` block; in-place activations are made out-of-place meanwhile, so that a layer's output
    keeps its own gradient. Everything is restored on exit."""

    def __init__(self, model: nn.Module, cells: Iterable[str | nn.Module] = ()):
        self.model = model
        cell_ids = {id(model.get_submodule(c)) if isinstance(c, str) else id(c) for c in cells}
        self.layers = discover(model, "", set(), set())
        self.cell_ids = cell_ids | {id(m) for m in model.modules() if isinstance(m, nn.RNNCellBase)}
        self.calls: list[Call] = []
        self._handles: list = []
        self._inplace: list[nn.Module] = []
        self._open: dict[int, list[Call]] = {}  # calls whose forward has started, not finished

    def __enter__(self) -> "Recorder":
        named = {id(m): n for n, m in self.model.named_modules()}
        roles = {id(layer.module): layer for layer in self.layers}
        for cid in self.cell_ids - set(roles):  # a parameter-free custom cell
            module = next(m for m in self.model.modules() if id(m) == cid)
            roles[cid] = Layer(named[cid], module, "cell", "")
        for layer in roles.values():
            role = "cell" if id(layer.module) in self.cell_ids else layer.role
            self._handles.append(layer.module.register_forward_pre_hook(self._pre(layer, role)))
            self._handles.append(layer.module.register_forward_hook(self._post()))
        for m in self.model.modules():
            if isinstance(getattr(m, "inplace", None), bool) and m.inplace:
                m.inplace = False
                self._inplace.append(m)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._inplace:
            m.inplace = True
        self._inplace.clear()

    def _pre(self, layer, role):
        def hook(module, args):
            k = sum(1 for c in self.calls if c.module is module)
            name = layer.name if k == 0 else f"{layer.name}#{k}"
            self.calls.append(Call(name, module, role, layer.activation,
                                   list(layer.params) if k == 0 else [], args, first_tensor(args)))
            self._open.setdefault(id(module), []).append(self.calls[-1])
        return hook

    def _post(self):
        def hook(module, args, output):
            call = self._open[id(module)].pop()
            call.raw_out = output
            call.out = first_tensor(output)
        return hook

    def depth(self) -> list[Call]:
        """Parameter-owning and recurrent calls in forward order, each with the activation calls that
        ran after it and before the next one. A parameter module that never ran (MultiheadAttention's
        out_proj, whose weights are used functionally) lends its parameters to its nearest ancestor
        that did."""
        entries: list[Call] = []
        for call in self.calls:  # appended as each call starts: forward order
            if call.role in ("param", "recurrent"):
                entries.append(call)
            elif call.role == "activation" and entries:
                entries[-1].acts.append(call)
        ran = {id(c.module) for c in self.calls}
        for layer in self.layers:
            if layer.role == "activation" or id(layer.module) in ran or not layer.params:
                continue
            owners = [c for c in entries if c.params and layer.name.startswith(c.name + ".")]
            if owners:
                max(owners, key=lambda c: len(c.name)).params.extend(layer.params)
        return entries

    def cells(self) -> list[Call]:
        return [c for c in self.calls if c.role == "cell"]

    def recurrent(self) -> list[Call]:
        return [c for c in self.calls if c.role == "recurrent" and isinstance(c.module, RECURRENT)]
