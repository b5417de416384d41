"""Which activation follows each layer: from module order, or from one traced forward pass.

An activation is described by a name in torch.nn.init.calculate_gain's vocabulary where one exists
("relu", "leaky_relu", "tanh", "sigmoid", "selu", "linear") plus the extra names below, and, for
the leaky family, its negative slope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.overrides import TorchFunctionMode

from gradwatch.collect.layers import activation_name
from gradwatch.remedies._common import forward_once

# The ReLU family gets He; "selu" gets LeCun; everything else (tanh, sigmoid, softmax, none) Xavier.
RELU_FAMILY = {"relu", "leaky_relu", "prelu", "elu", "gelu", "silu", "mish", "softplus", "hardswish"}


@dataclass(frozen=True)
class Act:
    """One activation: its name and, for leaky ReLU / PReLU, the negative slope."""

    name: str
    slope: float = 0.0

    def __str__(self) -> str:
        return f"{self.name}({self.slope:g})" if self.name in ("leaky_relu", "prelu") else self.name


NONE = Act("linear")

_MODULES: dict[type, Callable[[nn.Module], Act]] = {
    nn.ReLU: lambda m: Act("relu"), nn.ReLU6: lambda m: Act("relu"),
    nn.LeakyReLU: lambda m: Act("leaky_relu", m.negative_slope),
    nn.RReLU: lambda m: Act("leaky_relu", (m.lower + m.upper) / 2),
    nn.PReLU: lambda m: Act("prelu", float(m.weight.detach().float().mean())),
    nn.ELU: lambda m: Act("elu"), nn.CELU: lambda m: Act("elu"), nn.GELU: lambda m: Act("gelu"),
    nn.SiLU: lambda m: Act("silu"), nn.Mish: lambda m: Act("mish"), nn.Softplus: lambda m: Act("softplus"),
    nn.Hardswish: lambda m: Act("hardswish"), nn.SELU: lambda m: Act("selu"),
    nn.Tanh: lambda m: Act("tanh"), nn.Hardtanh: lambda m: Act("tanh"), nn.Softsign: lambda m: Act("tanh"),
    nn.Sigmoid: lambda m: Act("sigmoid"), nn.Hardsigmoid: lambda m: Act("sigmoid"),
    nn.Softmax: lambda m: Act("softmax"), nn.LogSoftmax: lambda m: Act("softmax"),
}


def _slope(args: tuple, kwargs: dict, default: float) -> float:
    value = kwargs.get("negative_slope", args[1] if len(args) > 1 else default)
    return float(value)


_FUNCTIONS: dict[Any, Callable[[tuple, dict], Act]] = {}
for _name, _fns in {
    "relu": (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6),
    "elu": (F.elu, F.celu), "gelu": (F.gelu,), "silu": (F.silu,), "mish": (F.mish,),
    "softplus": (F.softplus,), "hardswish": (F.hardswish,), "selu": (F.selu, torch.selu),
    "tanh": (torch.tanh, torch.Tensor.tanh, F.tanh, F.hardtanh, F.softsign),
    "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, F.hardsigmoid),
    "softmax": (F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax),
}.items():
    for _fn in _fns:
        _FUNCTIONS[_fn] = (lambda name: lambda a, k: Act(name))(_name)
_FUNCTIONS[F.leaky_relu] = lambda a, k: Act("leaky_relu", _slope(a, k, 0.01))
_FUNCTIONS[F.leaky_relu_] = _FUNCTIONS[F.leaky_relu]
_FUNCTIONS[F.prelu] = lambda a, k: Act("prelu", float(a[1].detach().float().mean()))


def module_act(module: nn.Module) -> Act | None:
    """The activation a module applies, or None if it is not an activation module. Other libraries'
    activation classes (Hugging Face's GELUActivation ...) are known by name, as the watch knows them."""
    for cls, describe in _MODULES.items():
        if isinstance(module, cls):
            return describe(module)
    name = activation_name(module)
    return Act("relu" if name == "relu6" else name) if name else None


def parametrization_modules(model: nn.Module) -> set[int]:
    """ids of the modules that compute parametrized tensors (torch.nn.utils.parametrize): part of
    their layer, not layers or steps of their own."""
    return {id(x) for m in model.modules() if isinstance(m, ParametrizationList) for x in m.modules()}


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose forward is one step in the order: no children, self-contained attention, or a
    parametrized layer (its only children are the parametrizations computing its weight, which are
    no step of their own)."""
    hidden = parametrization_modules(model)
    out = []
    for name, m in model.named_modules():
        own = [c for n, c in m.named_children() if n != "parametrizations"]
        if id(m) not in hidden and (isinstance(m, nn.MultiheadAttention) or not own):
            out.append((name, m))
    return out


def _foreign(module: nn.Module) -> bool:
    """A module defined outside torch: what it computes is known only from what it calls."""
    return type(module).__module__.split(".")[0] != "torch"


def _follow(events: list[tuple[str, Any]], layers: set[str]) -> dict[str, Act]:
    """Each layer -> the first activation after it, before the next layer (NONE if there is none)."""
    found: dict[str, Act] = {}
    for i, (kind, value) in enumerate(events):
        if kind != "layer" or value in found or value not in layers:
            continue
        found[value] = NONE
        for kind2, value2 in events[i + 1:]:
            if kind2 == "layer":
                break
            if kind2 == "act":
                found[value] = value2
                break
    return found


def by_registration(model: nn.Module, layers: set[str]) -> dict[str, Act]:
    """Following activation of each layer from module registration order (no forward pass)."""
    events: list[tuple[str, Any]] = []
    for name, m in _leaves(model):
        act = module_act(m)
        if name in layers:
            events.append(("layer", name))
        elif act is not None:
            events.append(("act", act))
    return _follow(events, layers)


class _Tracer(TorchFunctionMode):
    """Records functional activations called outside any leaf module (e.g. F.relu in a forward), or
    directly inside a leaf module from another library (F.gelu in Hugging Face's GELUActivation):
    a torch leaf's own calls (the softmax inside nn.MultiheadAttention) are its business."""

    def __init__(self, events: list, running: list[nn.Module]) -> None:
        super().__init__()
        self.events, self.running = events, running

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        describe = _FUNCTIONS.get(func)
        if describe is not None and self._counts():
            self.events.append(("act", describe(args, kwargs)))
        return func(*args, **kwargs)

    def _counts(self) -> bool:
        return not self.running or (len(self.running) == 1 and _foreign(self.running[0]))


def by_execution(model: nn.Module, layers: set[str], example_input: Any) -> dict[str, Act]:
    """Following activation of each layer from one forward pass (eval mode, no grad, state kept)."""
    events: list[tuple[str, Any]] = []
    running: list[nn.Module] = []  # the leaf modules whose forward is running, outermost first
    handles = []

    def pre(name: str, m: nn.Module) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            if not running:
                if name in layers:
                    events.append(("layer", name))
                elif (act := module_act(module)) is not None:
                    events.append(("act", act))
            running.append(module)
        return hook

    def post(module: nn.Module, args: Any, out: Any) -> None:
        running.pop()

    try:
        for name, m in _leaves(model):
            handles.append(m.register_forward_pre_hook(pre(name, m)))
            handles.append(m.register_forward_hook(post))
        with _Tracer(events, running):
            forward_once(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return _follow(events, layers)
