"""gw.init_(model): initialise each layer for the activation that follows it, and say what was done.

Why per layer: the right weight scale depends on the nonlinearity after the layer. Variance is
kept constant through depth by He for the ReLU family (He et al. 2015, std = gain/√fan_in with
gain √2, or √(2/(1+a²)) for a leaky slope a), Xavier/Glorot for tanh, sigmoid, softmax and no
activation (Glorot & Bengio 2010, uniform, gain from ``nn.init.calculate_gain``), LeCun normal for
SELU (Klambauer et al. 2017, std = 1/√fan_in), orthogonal recurrent matrices (Saxe et al. 2014),
one gate chunk at a time, so that repeated multiplication by W_hh neither shrinks nor grows a
signal. Biases start at zero. Every formula is torch.nn.init's own.

A constant weight (all zeros, or every unit with the same weights) is reported: such units get the
same gradient and stay identical forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.errors import ConfigError
from gradwatch.remedies._activations import NONE, RELU_FAMILY, Act, by_execution, by_registration

SCHEMES = ("auto", "he", "xavier", "lecun", "orthogonal")
_FEEDFORWARD = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


@dataclass
class InitRow:
    """What init_ did to one weight tensor."""

    name: str
    module_type: str
    activation: str
    scheme: str
    gain: float
    std: float


@dataclass
class InitReport:
    """The rows of what was initialised, and the constant weights found before."""

    rows: list[InitRow] = field(default_factory=list)
    constant_before: list[str] = field(default_factory=list)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        head = ("weight", "type", "followed by", "init", "gain", "std")
        body = [(r.name, r.module_type, r.activation, r.scheme, f"{r.gain:.3g}", f"{r.std:.3g}") for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("biases: zeros")
        lines += [f"was constant: {msg}" for msg in self.constant_before]
        return "\n".join(lines)


def _is_inside_attention(name: str, attention: list[str]) -> bool:
    return any(name.startswith(a + ".") for a in attention)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers init_ handles, by name; linear maps owned by nn.MultiheadAttention keep its own init."""
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return {n: m for n, m in model.named_modules()
            if isinstance(m, _FEEDFORWARD + tuple(_GATES)) and not _is_inside_attention(n, attention)}


def _gain(act: Act) -> float:
    """nn.init.calculate_gain for the activation (SELU gets 1: torch's advice for self-normalising nets)."""
    if act.name in ("leaky_relu", "prelu"):
        return nn.init.calculate_gain("leaky_relu", act.slope)
    if act.name in RELU_FAMILY:
        return nn.init.calculate_gain("relu")
    return nn.init.calculate_gain(act.name if act.name in ("tanh", "sigmoid") else "linear")


def _apply(w: torch.Tensor, scheme: str, act: Act, transposed: bool = False) -> tuple[float, float]:
    """Initialise `w` in place with `scheme` for activation `act`; returns (gain, target std)."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    mode = "fan_in"
    if transposed:  # ConvTranspose weights are (in, out, k...): torch's "fan_out" is the input side
        fan_in, fan_out, mode = fan_out, fan_in, "fan_out"
    if scheme == "he":
        slope = act.slope if act.name in ("leaky_relu", "prelu") else 0.0
        nn.init.kaiming_normal_(w, a=slope, mode=mode, nonlinearity="leaky_relu")
        gain = nn.init.calculate_gain("leaky_relu", slope)
        return gain, gain / math.sqrt(fan_in)
    if scheme == "lecun":
        nn.init.kaiming_normal_(w, mode=mode, nonlinearity="linear")
        return 1.0, 1.0 / math.sqrt(fan_in)
    gain = _gain(act)
    if scheme == "orthogonal":
        nn.init.orthogonal_(w, gain=gain)
        return gain, gain / math.sqrt(max(w.shape[0], w[0].numel()))
    nn.init.xavier_uniform_(w, gain=gain)
    return gain, gain * math.sqrt(2.0 / (fan_in + fan_out))


def _auto_scheme(act: Act) -> str:
    if act.name in RELU_FAMILY:
        return "he"
    if act.name == "selu":
        return "lecun"
    return "xavier"  # tanh, sigmoid, softmax, none


def _init_recurrent(name: str, m: nn.Module, scheme: str, rows: list[InitRow]) -> None:
    chunks = next(n for cls, n in _GATES.items() if isinstance(m, cls))
    inner = Act(getattr(m, "nonlinearity", "tanh")) if chunks == 1 else Act("sigmoid")
    shown = getattr(m, "nonlinearity", "tanh") if chunks == 1 else "gates (sigmoid/tanh)"
    for pname, p in m.named_parameters(recurse=False):
        if pname.startswith("bias"):
            continue
        if scheme != "auto":
            chosen = scheme
        else:
            chosen = "orthogonal" if pname.startswith("weight_hh") else "xavier"
        parts = p.data.chunk(chunks, 0) if p.shape[0] % chunks == 0 and not pname.startswith("weight_hr") else (p.data,)
        for part in parts:  # one gate at a time: each gate's matrix is its own map
            gain, std = _apply(part, chosen, Act("linear") if chosen == "orthogonal" else inner)
        rows.append(InitRow(f"{name}.{pname}" if name else pname, type(m).__name__, shown, chosen, gain, std))


def check_constant_init(model: nn.Module) -> list[str]:
    """Weights (2-d or more) that are constant, or whose units all share the same weights."""
    found = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or p.numel() == 0:
                continue
            flat = p.detach().reshape(p.shape[0], -1)
            if bool((flat == flat.reshape(-1)[0]).all()):
                found.append(f"{name} is all {float(flat.reshape(-1)[0]):g}: its {p.shape[0]} units compute the "
                             "same output and get the same gradient, so they never differ; re-initialise "
                             "(gw.init_(model))")
            elif p.shape[0] > 1 and bool((flat == flat[:1]).all()):
                found.append(f"{name}: all {p.shape[0]} units have identical weights, so they get identical "
                             "gradients and never differ; re-initialise (gw.init_(model))")
    return found


@torch.no_grad()
def init_(model: nn.Module, scheme: str = "auto", *, example_input: Any = None) -> InitReport:
    """Re-initialise every Linear/Conv/recurrent layer of `model` in place; returns what was done.

    `scheme="auto"` picks per layer from the activation that follows it; "he", "xavier", "lecun" or
    "orthogonal" force one scheme on every weight (recurrent ones included). With `example_input`
    one forward pass (eval mode, no grad) finds the order the layers and activations really run in,
    functional calls such as F.relu included; without it, module registration order is used.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={model!r} is not a torch.nn.Module; pass the model to initialise")
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}; use 'auto' to choose per layer")
    layers = _layers(model)
    if not layers:
        raise ConfigError(f"model {type(model).__name__} has no Linear, Conv or recurrent layer to initialise; "
                          "pass the model whose layers you want initialised")
    report = InitReport(constant_before=check_constant_init(model))
    follows = by_registration(model, set(layers))
    if example_input is not None:
        follows.update(by_execution(model, set(layers), example_input))
    for name, m in layers.items():
        if isinstance(m, tuple(_GATES)):
            _init_recurrent(name, m, scheme, report.rows)
        else:
            act = follows.get(name, NONE)
            chosen = _auto_scheme(act) if scheme == "auto" else scheme
            transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
            gain, std = _apply(m.weight.data, chosen, act, transposed)
            report.rows.append(InitRow(f"{name}.weight" if name else "weight", type(m).__name__, str(act),
                                       chosen, gain, std))
        for pname, p in m.named_parameters(recurse=False):
            if pname.startswith("bias"):
                nn.init.zeros_(p)
    return report


__all__ = ["init_", "InitReport", "InitRow", "check_constant_init", "SCHEMES"]
