"""Which modules are watched, what they are called, and the parameters each one owns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

# Activation modules and the name of their nonlinearity.
ACTIVATIONS: dict[type, str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Softsign: "softsign",
    nn.Softplus: "softplus",
    nn.Hardtanh: "hardtanh",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardswish: "hardswish",
    nn.LogSigmoid: "logsigmoid",
}

# Asymptotes (low, high) of the saturating nonlinearities. An output is saturated when it lies within
# 1% of an asymptote's magnitude from it: sigmoid y < 0.01 or y > 0.99, tanh |y| > 0.99.
SATURATING: dict[str, tuple[float, float]] = {
    "sigmoid": (0.0, 1.0),
    "hardsigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
    "softsign": (-1.0, 1.0),
    "hardtanh": (-1.0, 1.0),
}
ASYMPTOTE_BAND = 0.01

RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)
# Parameter containers: a hand-written deep net keeps its layers' weights in one of these and
# applies them in a loop, so each weight is a layer of its own (lumped, a vanishing gradient
# across them would be one norm).
CONTAINERS = (nn.ParameterList, nn.ParameterDict)


def compiled_inner(module: nn.Module) -> nn.Module | None:
    """The model inside `torch.compile(model)`'s wrapper (None: not a wrapper). Its layers keep
    their own names; the wrapper is where a call enters the compiled code."""
    if type(module).__name__ != "OptimizedModule":  # (first: a missing attribute costs nn.Module a raise)
        return None
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def has_lazy_params(model: nn.Module) -> bool:
    """nn.LazyLinear & co. before their first forward: no shape yet, and no hook can be put on them."""
    return any(nn.parameter.is_lazy(p) for p in model.parameters())


# Other libraries' parameter-free activation modules, by class name without "Activation"
# (Hugging Face's GELUActivation, NewGELUActivation, QuickGELUActivation, SiLUActivation ...).
ACTIVATION_NAMES = {"gelu": "gelu", "newgelu": "gelu", "fastgelu": "gelu", "quickgelu": "gelu", "gelutanh": "gelu",
                    "gelupytorchtanh": "gelu", "silu": "silu", "swish": "silu", "mish": "mish", "relu": "relu",
                    "relu6": "relu6", "sigmoid": "sigmoid", "tanh": "tanh"}


def activation_name(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls in ACTIVATIONS:
            return ACTIVATIONS[cls]
    name = type(module).__name__.lower().removesuffix("activation")
    if name in ACTIVATION_NAMES and next(module.parameters(recurse=False), None) is None:
        return ACTIVATION_NAMES[name]
    return ""


@dataclass
class Layer:
    """A watched module and the trainable parameters it owns directly (not its children's)."""

    name: str
    module: nn.Module
    role: str  # "param" | "activation" | "recurrent"
    activation: str
    params: list[torch.nn.Parameter] = field(default_factory=list)
    index: int = -1  # forward order, set when the module first finishes a forward
    ran: bool = False  # its module's own forward ran (else it took its parent's turn)

    @property
    def type(self) -> str:
        """The module's class name; FSDP2's `fully_shard` swaps in a subclass named `FSDP<Name>`,
        reported under its own name so a sharded run compares with an unsharded one."""
        cls = type(self.module)
        for base in cls.__bases__:
            if cls.__name__ == f"FSDP{base.__name__}":
                return base.__name__
        return cls.__name__


def newly_trainable(model: nn.Module, prefix: str, seen_params: set[int], known: set[int]) -> list[Layer]:
    """Layers for the modules of `model` that own trainable parameters no layer holds: a backbone
    unfrozen for fine-tuning (`requires_grad_(True)` after watching began). `known`: the ids of
    modules that are layers already (their own parameters made trainable later are not added)."""
    layers = []
    for qualname, module in model.named_modules():
        if id(module) not in known and (own := _claim(module, seen_params)):
            layers += _layers_of(module, prefix, qualname, _role(module, own), own)
    return layers


def discover(model: nn.Module, prefix: str, seen_params: set[int], seen_modules: set[int]) -> list[Layer]:
    """The layers of `model` in registration order, skipping modules and parameters seen before
    (shared modules and tied weights are counted once, under their first name)."""
    layers = []
    for qualname, module in model.named_modules():
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        # (a model's root or a container is one layer per weight: its parametrizations stay layers of their own)
        own = _claim(module, seen_params, parametrized=not _per_weight(module, qualname, "param"))
        role = _role(module, own)
        if role:
            layers += _layers_of(module, prefix, qualname, role, own)
    return layers


def rename(layers: list[Layer], model: nn.Module, prefix: str) -> None:
    """Name `layers` (modules of `model`, found before it in pieces of it) as `discover(model,
    prefix)` names them."""
    qualname = {id(m): q for q, m in model.named_modules()}
    for layer in layers:
        q = qualname[id(layer.module)]
        if _per_weight(layer.module, q, layer.role):  # one layer per weight: keep its key
            layer.name = _weight_name(prefix, q, layer.module, layer.name.rsplit(".", 1)[-1])
        else:
            layer.name = _name(prefix, q, layer.module)


def _claim(module: nn.Module, seen_params: set[int], parametrized: bool = True) -> list[torch.nn.Parameter]:
    """The module's own trainable parameters no layer holds yet, now held; a parametrized module's
    (weight_norm, spectral_norm, orthogonal, a custom parametrize) with the originals its
    parametrizations hold: one layer, where the ParametrizationList stood as a layer of its own
    before the module, left with its bias alone (two layers of the depth profile for one)."""
    held = list(module._parameters.values())
    if parametrized and parametrize.is_parametrized(module):
        held += list(module.parametrizations.parameters())
    own = [p for p in held if p is not None and p.requires_grad and id(p) not in seen_params]
    seen_params.update(id(p) for p in own)
    return own


def _role(module: nn.Module, own: list) -> str | None:
    if isinstance(module, RECURRENT):
        return "recurrent"
    if activation_name(module):
        return "activation"
    return "param" if own else None


def _name(prefix: str, qualname: str, module: nn.Module) -> str:
    return ".".join(x for x in (prefix, qualname) if x) or type(module).__name__


def _per_weight(module: nn.Module, qualname: str, role: str) -> bool:
    """One layer per weight, named by its key: a ParameterList's entries, as the loop uses them,
    and the bare parameters of a model's root (a `temp` or `pos_embedding` of its own, or every
    weight of a net written by hand), which named after the model's class would read as the
    whole model, lumped in one norm."""
    if role != "param":
        return False
    root_of_a_model = not qualname and (any(True for _ in module.children())
                                        or not type(module).__module__.startswith("torch."))
    return isinstance(module, CONTAINERS) or root_of_a_model


def _weight_name(prefix: str, qualname: str, module: nn.Module, key: str) -> str:
    if isinstance(module, CONTAINERS):
        return f"{_name(prefix, qualname, module)}.{key}"
    return ".".join(x for x in (prefix, qualname, key) if x)


def recurrent_activation(module: nn.Module) -> str:
    """The nonlinearity a recurrent layer's output comes through: tanh (an RNN's default; a GRU's
    state mixes tanh candidates; an LSTM's is o·tanh(c)), relu for `nn.RNN(nonlinearity="relu")`;
    its output's statistics are read as that activation's (saturated units, dead ones)."""
    if not isinstance(module, RECURRENT) or getattr(module, "proj_size", 0):  # (a projected LSTM's output is linear)
        return ""
    return "relu" if getattr(module, "nonlinearity", "tanh") == "relu" else "tanh"


def _layers_of(module: nn.Module, prefix: str, qualname: str, role: str, own: list) -> list[Layer]:
    act = activation_name(module) or recurrent_activation(module)
    if _per_weight(module, qualname, role):
        keys = [k for k, p in module._parameters.items() if p is not None and any(p is q for q in own)]
        return [Layer(_weight_name(prefix, qualname, module, k), module, role, act, [module._parameters[k]])
                for k in keys]
    return [Layer(_name(prefix, qualname, module), module, role, act, own)]
