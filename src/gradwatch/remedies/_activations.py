"""Which activation follows each layer: from module order, or from one traced forward pass.

An activation is described by a name in torch.nn.init.calculate_gain's vocabulary where one exists
("relu", "leaky_relu", "tanh", "sigmoid", "selu", "linear") plus the extra names below, and, for
the leaky family, its negative slope.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

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


def _transformer_acts(model: nn.Module, layers: set[str]) -> dict[str, Act]:
    """torch's transformer layers apply their `activation` (a module registered after linear2, or a
    function such as the default F.relu) between linear1 and linear2: registration order alone
    would give linear1 none and linear2 the activation (He, gain √2, on the residual branch)."""
    found: dict[str, Act] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            act = m.activation
            known = module_act(act) if isinstance(act, nn.Module) else _FUNCTIONS.get(act, lambda a, k: None)((), {})
            prefix = f"{name}." if name else ""
            found.update({prefix + "linear1": known or NONE, prefix + "linear2": NONE})
    return {n: a for n, a in found.items() if n in layers}


_CONV_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # batch, instance, group


def _shared_block_acts(model: nn.Module, found: dict[str, Act]) -> dict[str, Act]:
    """In a block with a forward of its own (not a Sequential) that registers one activation
    module, a layer whose next sibling is a batch/instance/group norm feeds that activation however
    the two are registered: conv -> bn -> relu, or a residual sum then relu. torchvision's
    Bottleneck registers its relu last, so registration order alone gave conv1 and conv2 no
    activation. Not after a LayerNorm: a post-LN transformer block's fc2 -> sum -> norm has none."""
    out: dict[str, Act] = {}
    for prefix, block in model.named_modules():
        if isinstance(block, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        children = list(block.named_children())
        acts = {module_act(c) for _, c in children} - {None}
        if len(acts) != 1:
            continue
        for (name, _), (_, after) in zip(children, children[1:]):
            full = f"{prefix}.{name}" if prefix else name
            if found.get(full) == NONE and isinstance(after, _CONV_NORMS):
                out[full] = next(iter(acts))
    return out


def by_registration(model: nn.Module, layers: set[str]) -> dict[str, Act]:
    """Following activation of each layer from module registration order (no forward pass)."""
    events: list[tuple[str, Any]] = []
    for name, m in _leaves(model):
        act = module_act(m)
        if name in layers:
            events.append(("layer", name))
        elif act is not None:
            events.append(("act", act))
    found = _follow(events, layers)
    return {**found, **_shared_block_acts(model, found), **_transformer_acts(model, layers)}


class _Flow:
    """Which layers each tensor of one forward pass comes from, through no activation yet: a layer
    gets the first activation its output reaches. Following the data, not the call order, matters
    where branches join: in a ResNet block with a downsampling shortcut, conv2 -> bn2 runs, then
    the shortcut's conv, then relu(main + shortcut); conv2 is followed by that relu."""

    def __init__(self) -> None:
        self.found: dict[str, Act] = {}
        self.sources: dict[int, frozenset[str]] = {}  # by id; an entry leaves with its tensor

    def sources_of(self, value: Any) -> frozenset[str]:
        tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        return frozenset().union(*(self.sources.get(id(t), frozenset()) for t in tensors))

    def mark(self, value: Any, sources: frozenset[str]) -> None:
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                if id(t) not in self.sources:  # forget it when it is freed, before its id can be reused
                    weakref.finalize(t, self.sources.pop, id(t), None)
                self.sources[id(t)] = sources

    def reaches(self, value: Any, act: Act) -> None:
        """`value` goes into `act` (or into another layer, for act NONE): its layers are followed by it."""
        for layer in self.sources_of(value):
            self.found.setdefault(layer, act)

    def passes(self, args: Any, out: Any) -> None:
        """Any other op: its output comes from the layers its inputs come from."""
        self.mark(out, self.sources_of(args))


class _Tracer(TorchFunctionMode):
    """Follows every op of the forward pass and records the functional activations called outside
    any leaf module (e.g. F.relu in a forward), or directly inside a leaf module from another
    library (F.gelu in Hugging Face's GELUActivation): a torch leaf's own calls (the softmax inside
    nn.MultiheadAttention) are its business."""

    def __init__(self, flow: _Flow, running: list[nn.Module]) -> None:
        super().__init__()
        self.flow, self.running = flow, running

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        describe = _FUNCTIONS.get(func)
        counts = describe is not None and self._counts()
        if counts:
            self.flow.reaches((args, kwargs), describe(args, kwargs))
        out = func(*args, **kwargs)
        if counts:
            self.flow.mark(out, frozenset())
        else:
            self.flow.passes((args, kwargs), out)
        return out

    def _counts(self) -> bool:
        return not self.running or (len(self.running) == 1 and _foreign(self.running[0]))


def by_execution(model: nn.Module, layers: set[str], example_input: Any) -> dict[str, Act]:
    """Following activation of each layer from one forward pass (eval mode, no grad, state kept)."""
    flow = _Flow()
    ran: list[str] = []
    running: list[nn.Module] = []  # the leaf modules whose forward is running, outermost first

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            if not running:
                if name in layers:
                    flow.reaches(args, NONE)  # a layer right after a layer: no activation between
                    ran.append(name)
                elif (act := module_act(module)) is not None:
                    flow.reaches(args, act)
            running.append(module)
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            running.pop()
            if not running and name in layers:
                flow.mark(out, frozenset([name]))
            elif not running and module_act(module) is not None:
                flow.mark(out, frozenset())
        return hook

    with _leaf_hooks(model, pre, post), _Tracer(flow, running):
        forward_once(model, example_input)
    return {name: flow.found.get(name, NONE) for name in ran}


class _Reaching(TorchFunctionMode):
    """Every op's output comes from what its inputs come from (`_Flow.passes`); what a call of
    `functions` made of a leaf's own output also comes from that leaf (`outputs`: id -> its name
    and the output, weakly)."""

    def __init__(self, flow: _Flow, functions: tuple, outputs: dict[int, tuple[str, weakref.ref]]) -> None:
        super().__init__()
        self.flow, self.functions, self.outputs = flow, functions, outputs

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaf = self.outputs.get(id(args[0])) if args and func in self.functions else None
        if leaf is not None and leaf[1]() is args[0]:
            self.flow.mark(out, self.flow.sources_of((args, kwargs)) | {leaf[0]})
        else:
            self.flow.passes((args, kwargs), out)
        return out


def reaching_output(model: nn.Module, example_input: Any, layers: tuple, kinds: tuple = (),
                    functions: tuple = ()) -> set[str]:
    """In one forward pass, the names of the modules of `kinds`, and of the leaf modules whose output
    a call of `functions` took (`torch.sigmoid(self.fc(x))`), whose result reaches the model's output
    through no module of `layers`: the output's own activations, also a head's that another head
    runs after (a sigmoid probability head, then a linear value head), which the call order alone
    takes for hidden. Through any other op (a flatten, a sum, a norm) the data is followed. A module
    of `kinds` that is one of `layers` too is its output's only source (the output layers themselves)."""
    flow = _Flow()
    outputs: dict[int, tuple[str, weakref.ref]] = {}
    returned: list[Any] = []

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(module, layers):  # (one of `kinds` too, insert_norm's output layer: itself alone)
                flow.mark(out, frozenset({name}) if isinstance(module, kinds) else frozenset())
            elif isinstance(module, kinds):
                flow.mark(out, flow.sources_of(args) | {name})
            if functions and isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, weakref.ref(out))
        return hook

    handle = model.register_forward_hook(lambda module, args, out: returned.append(out))
    try:
        with _leaf_hooks(model, None, post), _Reaching(flow, tuple(functions), outputs):
            forward_once(model, example_input)
    finally:
        handle.remove()
    return set(flow.sources_of(returned))


@contextlib.contextmanager
def _leaf_hooks(model: nn.Module, pre: Callable[[str], Callable] | None,
                post: Callable[[str], Callable]) -> Iterator[None]:
    """A forward pre-hook `pre(name)` (unless None) and a forward hook `post(name)` on each leaf
    module, removed on leaving, whatever the forward raised."""
    handles = []
    try:
        for name, m in _leaves(model):
            if pre is not None:
                handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        yield
    finally:
        for h in handles:
            h.remove()


class _Calls(TorchFunctionMode):
    """Records the functional activations called outside every leaf module (in a forward of the user's)."""

    def __init__(self, running: list[nn.Module], names: set[str]) -> None:
        super().__init__()
        self.running, self.names, self.calls = running, names, []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        describe = _FUNCTIONS.get(func)
        if describe is not None and not self.running and describe(args, kwargs).name in self.names:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def functional_calls(model: nn.Module, example_input: Any, modules: tuple) -> list[str]:
    """The functions (``sigmoid``, ``tanh`` ...) one forward pass calls outside any module that apply
    the activation of one of the `modules` classes: what swapping those modules cannot reach."""
    names = set()
    for cls in modules:
        try:
            act = module_act(cls())
        except Exception:  # a class that needs arguments: no functional twin to look for
            act = None
        if act is not None:
            names.add(act.name)
    if not names:
        return []
    running: list[nn.Module] = []  # the leaf modules whose forward is running

    def enter(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:  # None: the args stay as they are
            running.append(module)
        return hook

    def leave(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:  # None: the output stays as it is
            running.pop()
        return hook

    with _leaf_hooks(model, enter, leave), _Calls(running, names) as mode:
        forward_once(model, example_input)
    return mode.calls
