"""The order of a model's layers from input to output, as its first forward runs them: the
order every table and plot lists layers in, and the one the vanishing rule compares along.
Declaration order is not it (a decoder declared before its encoder, weights used functionally)."""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from gradwatch.collect.layers import Layer
from gradwatch.collect.unsaved import Unsaved


class ForwardOrder:
    """Numbers layers (`Layer.index`) as their forwards finish during one step, children before
    parents; `settle()` at the end of that step numbers the rest and removes the hooks."""

    def __init__(self) -> None:
        self._handles: list = []
        self._arrivals: dict[int, int] = {}  # parameter index -> rank of its gradient in the first backward
        self._next = 0

    def register(self, model: nn.Module, new: list[Layer], params: list[nn.Parameter]) -> None:
        """Watch `model`'s next forward for the order of its `new` layers. `params`: every watched
        parameter, whose first gradients place weights used functionally (empty: not tracked)."""
        by_module: dict[int, list[Layer]] = {}
        for layer in new:
            by_module.setdefault(id(layer.module), []).append(layer)
        for _, module in model.named_modules():
            subtree = [l for m in module.modules() for l in by_module.get(id(m), [])]
            if subtree:
                self._handles.append(module.register_forward_hook(Unsaved(self._order_hook(subtree))))
        # a module whose forward never runs (weights used functionally by its parent) takes its
        # parent's turn; where a weight is used functionally, the order of the first backward places it
        mine = {id(p) for layer in new for p in layer.params}
        for i, p in enumerate(params):
            if id(p) in mine and p.requires_grad:  # (torch refuses a hook on a frozen one)
                self._handles.append(p.register_post_accumulate_grad_hook(self._arrival_hook(i)))

    def _arrival_hook(self, i: int):
        def hook(p) -> None:
            self._arrivals.setdefault(i, len(self._arrivals))
        return hook

    def _order_hook(self, subtree: list[Layer]):
        def hook(module, args, output):
            for layer in subtree:
                layer.ran = layer.ran or layer.module is module
                if layer.index < 0:
                    layer.index = self._next
                    self._next += 1
        return hook  # traced by torch.compile at a first compiled call: a plain side effect, no graph break

    def settle(self, layers: list[Layer], params: list[nn.Parameter]) -> None:
        """End of a step: layers that did not run are numbered last, weights used functionally
        move to where their gradients arrived, and the numbers close their gaps."""
        if not self._handles:
            return
        self.remove_hooks()
        for layer in layers:
            if layer.index < 0:
                layer.index = self._next
                self._next += 1
        if self._arrivals:
            _place_borrowed(layers, params, self._arrivals)
        self._arrivals = {}
        # layers numbered again (a model whose pieces ran first) leave gaps where they were
        for k, layer in enumerate(sorted(layers, key=lambda l: l.index)):
            layer.index = k
        self._next = len(layers)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _place_borrowed(layers: list[Layer], params: list[nn.Parameter], arrivals: dict[int, int]) -> None:
    """Weights whose module never ran its own forward (a ParameterList applied in a loop), or
    ran it around other layers (bare parameters of the model itself), were numbered after
    those children, above the output layer. Gradients reach weights in reverse order of use, so
    the first backward's order puts each just below the first layer that got its gradient earlier."""
    rank = {id(p): arrivals[k] for k, p in enumerate(params) if k in arrivals}
    first = {id(l): min((rank[id(p)] for p in l.params if id(p) in rank), default=None) for l in layers}
    modules = {id(l.module) for l in layers}

    def parent(l: Layer) -> bool:  # its forward calls other layers (not its weight's parametrization)
        return any(id(m) in modules for m in l.module.modules()
                   if m is not l.module and not isinstance(m, ParametrizationList))
    borrowed = [l for l in layers if l.role == "param" and first[id(l)] is not None
                and (not l.ran or parent(l))]
    if not borrowed:
        return
    moved = {id(b) for b in borrowed}
    order = [l for l in sorted(layers, key=lambda l: l.index) if id(l) not in moved]
    for b in sorted(borrowed, key=lambda l: -first[id(l)]):  # lowest first
        at = next((k for k, l in enumerate(order) if l.role != "activation" and first[id(l)] is not None
                   and first[id(l)] < first[id(b)]), len(order))
        order.insert(at, b)
    for k, layer in enumerate(order):
        layer.index = k
