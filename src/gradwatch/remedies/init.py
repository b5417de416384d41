"""gw.init_(model): initialise each layer for the activation that follows it, and say what was done.

Why per layer: the right weight scale depends on the nonlinearity after the layer. Variance is
kept constant through depth by He for the ReLU family (He et al. 2015, std = gain/√fan_in with
gain √2, or √(2/(1+a²)) for a leaky slope a), Xavier/Glorot for tanh, sigmoid, softmax and no
activation (Glorot & Bengio 2010, uniform, gain from ``nn.init.calculate_gain``), LeCun normal for
SELU (Klambauer et al. 2017, std = 1/√fan_in), orthogonal recurrent matrices (Saxe et al. 2014),
one gate chunk at a time, so that repeated multiplication by W_hh neither shrinks nor grows a
signal. Biases start at zero, but the memory gate of an LSTM (forget) or GRU (update) at 1, so that
the state, and the gradient through it, is not halved every step. Every draw is torch.nn.init's own,
with torch's fans except for a transposed conv, whose torch fans ignore its groups and stride (see
`_fans`).

A parametrized weight (weight_norm, spectral_norm, register_parametrization) is what the forward
uses, not its `.original`: it is set by assignment, through the parametrization's right_inverse;
one that cannot be set is left alone and the report says so.

A constant weight (all zeros, or every unit with the same weights) is reported: such units get the
same gradient and stay identical forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from gradwatch.errors import ConfigError
from gradwatch.remedies._common import shown
from gradwatch.remedies._activations import (NONE, RELU_FAMILY, Act, by_execution, by_registration, module_act,
                                             parametrization_modules)

SCHEMES = ("auto", "he", "xavier", "lecun", "orthogonal")
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FEEDFORWARD = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED)
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
    notes: list[str] = field(default_factory=list)  # frozen layers, parametrized tensors left alone or rescaled
    memory_gates: list[str] = field(default_factory=list)  # b_ih of gated cells whose memory gate got bias 1

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
        lines.append("biases: zeros" + (f"; memory gates (LSTM forget, GRU update) 1: {', '.join(self.memory_gates)}"
                                        if self.memory_gates else ""))
        lines += [f"was constant: {msg}" for msg in self.constant_before]
        lines += [f"note: {msg}" for msg in self.notes]
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


def _fans(m: nn.Module, w: torch.Tensor) -> tuple[float, float]:
    """(fan_in, fan_out) of `w`, a weight of `m` or one gate block of it: the terms summed into one
    output, and the outputs one input reaches. torch's, except for a transposed conv, whose weight
    is (in, out/groups, k...) and whose torch fans ignore groups and stride: each output sums
    (in/groups)·Π(k/stride) terms on average (of an input's k taps, one in `stride` lands on it),
    and each input reaches (out/groups)·Πk outputs."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    if not isinstance(m, _TRANSPOSED):
        return fan_in, fan_out
    taps = math.prod(w.shape[2:]) / math.prod(m.stride)
    return w.shape[0] / m.groups * taps, fan_in


def _apply(w: torch.Tensor, scheme: str, act: Act, fans: tuple[float, float]) -> tuple[float, float]:
    """Initialise `w` in place with `scheme` for activation `act`; returns (gain, target std).
    The draws are kaiming_normal_'s and xavier_uniform_'s, with the fans given."""
    fan_in, fan_out = fans
    if scheme in ("he", "lecun"):
        slope = act.slope if act.name in ("leaky_relu", "prelu") else 0.0
        gain = nn.init.calculate_gain("leaky_relu", slope) if scheme == "he" else 1.0
        std = gain / math.sqrt(fan_in)
        nn.init.normal_(w, 0.0, std)
        return gain, std
    gain = _gain(act)
    if scheme == "orthogonal":
        nn.init.orthogonal_(w, gain=gain)
        return gain, gain / math.sqrt(max(w.shape[0], w[0].numel()))
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    nn.init.uniform_(w, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
    return gain, std


def _full(module_name: str, pname: str) -> str:
    return f"{module_name}.{pname}" if module_name else pname


def _own_tensors(m: nn.Module) -> list[str]:
    """Names of the tensors a module owns: its parameters, and those a parametrization computes."""
    return [n for n, _ in m.named_parameters(recurse=False)] + list(getattr(m, "parametrizations", {}))


def _assign(m: nn.Module, pname: str, value: torch.Tensor) -> tuple[bool, str]:
    """Make `m.<pname>` `value`: a parametrized tensor (weight_norm ...) is assigned, which goes
    through its parametrization's right_inverse (initialising `.original` in place would change
    nothing the forward uses). Returns (whether it changed, a note if it did not become `value`)."""
    legacy = _legacy_hook(m, pname)
    if isinstance(legacy, WeightNorm):  # v = value, g = its norm: the weight the next forward computes is `value`
        getattr(m, f"{pname}_v").copy_(value)
        getattr(m, f"{pname}_g").copy_(torch.norm_except_dim(value, 2, legacy.dim))
        setattr(m, pname, legacy.compute_weight(m))
        return True, ""
    if isinstance(legacy, SpectralNorm):  # the forward divides weight_orig by its top singular value
        getattr(m, f"{pname}_orig").copy_(value)
        for _ in range(SPECTRAL_ITERS):  # its u, v estimate of that value, for the new weight
            weight = legacy.compute_weight(m, do_power_iteration=True)
        setattr(m, pname, weight)
        return True, (f"set through SpectralNorm (torch.nn.utils.spectral_norm), which fixes its scale: std "
                      f"{float(weight.std()):.3g}, not the target")
    if not parametrize.is_parametrized(m, pname):
        getattr(m, pname).copy_(value)
        return True, ""
    kinds = "/".join(type(p).__name__ for p in m.parametrizations[pname])
    try:
        setattr(m, pname, value)
    except (RuntimeError, ValueError) as exc:  # no right_inverse, or one refusing this value
        return False, (f"left alone: it is computed by the parametrization {kinds}, which cannot be set ({exc}); "
                       f"initialise parametrizations.{pname}.original yourself")
    got = getattr(m, pname)
    if float((got - value).norm()) > 1e-4 * float(value.norm()):
        return True, f"set through {kinds}, which fixes its scale: std {float(got.std()):.3g}, not the target"
    return True, ""


SPECTRAL_ITERS = 20  # power iterations for a legacy spectral_norm's u, v after a new weight_orig


def _legacy_hook(m: nn.Module, pname: str) -> WeightNorm | SpectralNorm | None:
    """The hook of the older `torch.nn.utils.weight_norm` / `spectral_norm` on `m.<pname>`: the weight is
    a plain tensor it recomputes from `<pname>_g`, `_v` (or `_orig`) before every forward. Made under
    no_grad it looked frozen (SNGAN/BigGAN discriminators, vocoders were left alone), and a copy into it
    was overwritten at the next forward."""
    return next((h for h in m._forward_pre_hooks.values()
                 if isinstance(h, (WeightNorm, SpectralNorm)) and h.name == pname), None)


def _init_weight(m: nn.Module, pname: str, scheme: str, act: Act, chunks: int = 1) -> tuple[float, float, bool, str]:
    """Initialise `m.<pname>`, `chunks` gate blocks each on its own; (gain, std) and `_assign`'s answer."""
    new = torch.empty_like(getattr(m, pname))
    for part in new.chunk(chunks, 0):
        gain, std = _apply(part, scheme, act, _fans(m, part))
    return (gain, std, *_assign(m, pname, new))


def _record(report: InitReport, name: str, m: nn.Module, pname: str, activation: str, scheme: str,
            done: tuple[float, float, bool, str]) -> None:
    gain, std, changed, note = done
    full = _full(name, pname)
    if note:
        report.notes.append(f"{full}: {note}")
    if changed:
        report.rows.append(InitRow(full, type(m).__name__, activation, scheme, gain, std))


def _auto_scheme(act: Act) -> str:
    if act.name in RELU_FAMILY:
        return "he"
    if act.name == "selu":
        return "lecun"
    return "xavier"  # tanh, sigmoid, softmax, none


def _trainable(m: nn.Module, pname: str) -> bool:
    """`m.<pname>` can be trained: requires grad (a parametrized one: through its `.original`s)."""
    if parametrize.is_parametrized(m, pname):
        return any(p.requires_grad for p in m.parametrizations[pname].parameters())
    legacy = _legacy_hook(m, pname)
    if legacy is not None:
        originals = ("_g", "_v") if isinstance(legacy, WeightNorm) else ("_orig",)
        return any(getattr(m, pname + k).requires_grad for k in originals)
    return getattr(m, pname).requires_grad


def _skip_frozen(name: str, m: nn.Module, pname: str, report: InitReport) -> bool:
    """A frozen tensor in a layer that otherwise trains (a frozen pretrained weight with a trained
    bias, BitFit's inverse) keeps its values: a new draw could never be trained."""
    if _trainable(m, pname):
        return False
    report.notes.append(f"{_full(name, pname)}: left alone: frozen (requires_grad=False) while the rest of "
                        f"{name or type(m).__name__} trains, so a new draw could never be trained; "
                        "unfreeze it first to initialise it")
    return True


def _init_recurrent(name: str, m: nn.Module, scheme: str, report: InitReport) -> None:
    chunks = next(n for cls, n in _GATES.items() if isinstance(m, cls))
    inner = Act(getattr(m, "nonlinearity", "tanh")) if chunks == 1 else Act("sigmoid")
    activation = getattr(m, "nonlinearity", "tanh") if chunks == 1 else "gates (sigmoid/tanh)"
    for pname in _own_tensors(m):
        if pname.startswith("bias") or _skip_frozen(name, m, pname, report):
            continue
        if scheme != "auto":
            chosen = scheme
        else:
            chosen = "orthogonal" if pname.startswith("weight_hh") else "xavier"
        split = getattr(m, pname).shape[0] % chunks == 0 and not pname.startswith("weight_hr")
        act = Act("linear") if chosen == "orthogonal" else inner  # one gate at a time: each its own map
        _record(report, name, m, pname, activation, chosen, _init_weight(m, pname, chosen, act, chunks if split else 1))


def _init_feedforward(name: str, m: nn.Module, scheme: str, act: Act, report: InitReport) -> None:
    chosen = _auto_scheme(act) if scheme == "auto" else scheme
    _record(report, name, m, "weight", str(act), chosen, _init_weight(m, "weight", chosen, act))


def _init_tied_feedforward(name: str, m: nn.Module, scheme: str, act: Act, report: InitReport,
                           aliases: dict[int, list[str]], done: dict[int, InitRow | None],
                           layer_weights: set[str]) -> None:
    """`_init_feedforward`, once per weight tensor: a weight tied between layers (``b.weight =
    a.weight``) drawn again would undo the first layer's draw and make its report row false. Notes
    say which draw a tied weight got, and that a layer tied to an embedding sets the embedding."""
    full = _full(name, "weight")
    tied = None if parametrize.is_parametrized(m, "weight") else id(m.weight)
    if tied is None or len(aliases.get(tied, ())) < 2:
        _init_feedforward(name, m, scheme, act, report)
        return
    others = [n for n in aliases[tied] if n != full]
    if tied in done:
        first = done[tied]
        if first is not None:
            want = _auto_scheme(act) if scheme == "auto" else scheme
            differs = (want, str(act)) != (first.scheme, first.activation)
            report.notes.append(f"{full} is tied to {first.name} (one tensor): initialised once, for {first.name} "
                                f"({first.scheme}, followed by {first.activation})"
                                + (f"; here it is followed by {act}, which would want {want}" if differs else ""))
        return
    rows = len(report.rows)
    _init_feedforward(name, m, scheme, act, report)
    done[tied] = report.rows[-1] if len(report.rows) > rows else None
    if done[tied] is not None and not any(n in layer_weights for n in others):  # tied to an embedding ...
        report.notes.append(f"{full} is tied to {', '.join(others)} (one tensor): the draw for {name or 'it'} "
                            f"sets {', '.join(others)} too")


# The gate that keeps a gated cell's state (LSTM's forget gate f, rows h:2h of i, f, g, o; GRU's update
# gate z, rows h:2h of r, z, n) sits at σ(0) = 1/2 with a zero bias: the state, and the gradient through
# it, halves every step. A bias of 1 keeps σ(1) = 0.73 per step (Gers, Schmidhuber & Cummins 2000;
# Jozefowicz, Zaremba & Sutskever 2015; Keras's unit_forget_bias), as gw.probe advises for such a cell.
MEMORY_GATE_BIAS = 1.0
_MEMORY_GATED = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)


def _zero_biases(name: str, m: nn.Module, report: InitReport) -> None:
    """Biases to zero, but a gated cell's memory gate, opened to MEMORY_GATE_BIAS in b_ih (b_hh is 0)."""
    for pname in _own_tensors(m):
        if pname.startswith("bias") and not _skip_frozen(name, m, pname, report):
            value = torch.zeros_like(getattr(m, pname))
            if isinstance(m, _MEMORY_GATED) and pname.startswith("bias_ih"):
                value[m.hidden_size:2 * m.hidden_size] = MEMORY_GATE_BIAS
                report.memory_gates.append(_full(name, pname))
            _, note = _assign(m, pname, value)
            if note:
                report.notes.append(f"{_full(name, pname)}: {note}")


def _tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(full name, module, tensor name) of every weight and bias as the forward uses it: a
    parametrized one as computed (weight_norm's g and v are not the weight), a tied one once."""
    hidden = parametrization_modules(model)
    seen: set[int] = set()
    for mname, m in model.named_modules():
        if id(m) in hidden:
            continue
        for pname in _own_tensors(m):
            if not parametrize.is_parametrized(m, pname):  # a computed tensor is new at every read
                key = id(getattr(m, pname))
                if key in seen:
                    continue
                seen.add(key)
            yield _full(mname, pname), m, pname


def _frozen(m: nn.Module) -> bool:
    """Every parameter of the layer is frozen: a frozen backbone's pretrained weights, not ones to draw."""
    params = list(m.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _remedy(m: nn.Module, pname: str, layers: set[int]) -> str:
    """How to re-initialise `m.<pname>`: gw.init_ only where it can."""
    if id(m) not in layers:
        return f"re-initialise it yourself (gw.init_ leaves {type(m).__name__} alone)"
    if _frozen(m):
        return "unfreeze it, then re-initialise (gw.init_ leaves frozen layers alone)"
    if parametrize.is_parametrized(m, pname) and not all(hasattr(p, "right_inverse") for p in m.parametrizations[pname]):
        return (f"re-initialise parametrizations.{pname}.original yourself (gw.init_ cannot set it: "
                "its parametrization has no right_inverse)")
    return "re-initialise (gw.init_(model))"


def _unit_rows(m: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """`w` as one row per unit the next layer reads: an output channel of a layer (dim 1 of a
    transposed conv's (in, out, k...) weight), a dimension of an embedding (its columns: each row
    is a token's vector, which only that token's gradient reaches)."""
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return w.detach().T
    if isinstance(m, _TRANSPOSED) and m.groups == 1:
        return w.detach().transpose(0, 1).reshape(w.shape[1], -1)
    return w.detach().reshape(w.shape[0], -1)


def _reads(m: nn.Module) -> torch.Tensor | None:
    """The weights `m` reads its input with, one row per input feature (channel), or None where that
    is not one matrix (grouped convs, modules init_ does not know)."""
    if isinstance(m, nn.Linear):
        return m.weight.detach().T
    if isinstance(m, _TRANSPOSED) and m.groups == 1:
        return m.weight.detach().reshape(m.weight.shape[0], -1)
    if isinstance(m, _FEEDFORWARD) and m.groups == 1:
        return m.weight.detach().transpose(0, 1).reshape(m.weight.shape[1], -1)
    if isinstance(m, tuple(_GATES)):
        w = getattr(m, "weight_ih_l0", None) if hasattr(m, "weight_ih_l0") else getattr(m, "weight_ih", None)
        return None if w is None else w.detach().T
    return None


def _next_layer(modules: list[tuple[str, nn.Module]], m: nn.Module, layers: set[int]) -> tuple[str, nn.Module] | None:
    """The first layer registered after `m` (and outside it): the one reading its output in a
    sequential model."""
    at = next(i for i, (_, x) in enumerate(modules) if x is m)
    inside = modules[at][0] + "."
    return next(((n, x) for n, x in modules[at + 1:] if id(x) in layers and not n.startswith(inside)), None)


def _same_rows(x: torch.Tensor) -> bool:
    return bool((x == x[:1]).all())


def _tied_by(m: nn.Module, units: torch.Tensor, consumer: tuple[str, nn.Module] | None) -> str | None:
    """Why units that start with identical weights stay identical, or None when training tells them
    apart. Unit i's gradient is δ_i·(its input), δ_i = f'(z_i)·Σ_k V[k, i]·δ'_k with V the weights
    the next layer reads it with: equal for all units only if they compute the same output (same
    weights and bias) and V weights them alike. The output layer's units each get their own δ from
    the loss (zero-initialising the classifier, Fixup's and ControlNet's zero layers, is sound)."""
    bias = getattr(m, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.ndim == 1 and bias.numel() == units.shape[0] \
            and not _same_rows(bias.detach().reshape(-1, 1)):
        return None  # different biases: the units compute different outputs
    if consumer is None:
        return None  # the last layer: the loss gives each output unit its own gradient
    name, layer = consumer
    reads = _reads(layer)
    if reads is None or reads.shape[0] % units.shape[0]:  # wiring unknown: say so, do not decide
        return (f"; if {name} ({type(layer).__name__}), the next layer, reads them alike, they get the same "
                "gradient and never differ")
    per_unit = reads.reshape(units.shape[0], -1)  # a flattened feature map: channel-major blocks
    if not _same_rows(per_unit):
        return None
    # Registration order, not a trace: a residual sum (x + f(x)) before the next layer would give
    # its columns different updates, and then the units different gradients.
    return (f" and {name} ({type(layer).__name__}), the next layer, reads them with identical weights "
            "(unless a residual x + f(x) comes between), so they get the same gradient and never differ")


def _refuse_lazy(model: nn.Module) -> None:
    """A lazy layer (nn.LazyLinear ...) has no weight before its first forward: nothing to draw into
    (torch failed inside the draw)."""
    lazy = [n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ConfigError(f"{', '.join(lazy)} not materialised yet (a lazy layer has no shape before its first "
                          "forward); pass example_input=<one batch>, whose forward pass creates them, or run one "
                          "forward before gw.init_")


def _refuse_meta(model: nn.Module) -> None:
    """A model built on the meta device has shapes and no values (torch failed at the first .item())."""
    meta = [n for n, p in model.named_parameters() if p.is_meta and not nn.parameter.is_lazy(p)]
    if meta:
        shown_names = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ConfigError(f"{shown_names} on the meta device (shapes, no storage); allocate them first, "
                          "model.to_empty(device='cpu') (or your device), before initialising or checking them")


def check_constant_init(model: nn.Module) -> list[str]:
    """Weights (2-d or more) whose units all start identical and stay so: same weights, same bias,
    and read alike by the next layer (registration order), so every unit gets the same gradient.
    The output layer, and a constant layer followed by one that tells its units apart (a random
    one), are not listed: their units get different gradients from the first step on."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={shown(model)} is not a torch.nn.Module; pass the model to check")
    _refuse_meta(model)
    layers = {id(m) for m in _layers(model).values()}
    modules = list(model.named_modules())
    found = []
    with torch.no_grad():
        for name, m, pname in _tensors(model):
            p = getattr(m, pname)
            if p.ndim < 2 or p.numel() == 0:
                continue
            flat = _unit_rows(m, p) if pname == "weight" else p.detach().reshape(p.shape[0], -1)
            if flat.shape[0] < 2 or not _same_rows(flat):  # one unit has no twin to stay equal to
                continue
            constant = bool((flat == flat.reshape(-1)[0]).all())
            why = " and get the same gradient, so they never differ"
            if pname == "weight" and not isinstance(m, tuple(_GATES)):
                tied = _tied_by(m, flat, _next_layer(modules, m, layers))
                if tied is None:
                    continue
                why = tied
            if constant:
                found.append(f"{name} is all {float(flat.reshape(-1)[0]):g}: its {flat.shape[0]} units compute the "
                             f"same output{why}; {_remedy(m, pname, layers)}")
            else:
                found.append(f"{name}: all {flat.shape[0]} units have identical weights{why}; "
                             f"{_remedy(m, pname, layers)}")
    return found


@torch.no_grad()
def init_(model: nn.Module, scheme: str = "auto", *, example_input: Any = None) -> InitReport:
    """Re-initialise every trainable Linear/Conv/recurrent layer of `model` in place; returns what
    was done. Frozen layers (no parameter requiring grad) are left alone and named in the notes.
    A parametrized weight (weight_norm ...) is set through its parametrization's right_inverse;
    the report's notes name any the parametrization rescales or that cannot be set.

    `scheme="auto"` picks per layer from the activation that follows it; "he", "xavier", "lecun" or
    "orthogonal" force one scheme on every weight (recurrent ones included). With `example_input`
    one forward pass (eval mode, no grad) follows each layer's output to the first activation it
    reaches, functional calls such as F.relu included; without it, module registration order is used.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={shown(model)} is not a torch.nn.Module; pass the model to initialise")
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}; use 'auto' to choose per layer")
    layers = _layers(model)
    if not layers:
        raise ConfigError(f"model {type(model).__name__} has no Linear, Conv or recurrent layer to initialise; "
                          "pass the model whose layers you want initialised")
    report = InitReport(constant_before=check_constant_init(model))  # (refuses a model on the meta device)
    feedforward = [m for m in layers.values() if not isinstance(m, tuple(_GATES))]
    if scheme == "auto" and example_input is None and len(feedforward) > 1 \
            and not any(module_act(m) for m in model.modules()) \
            and any(not type(m).__module__.startswith("torch.") for m in model.modules()):
        # A forward of its own with F.relu calls and no activation module: registration order sees no
        # activation, and every layer would silently get the init for none (a ReLU CNN got Xavier).
        report.notes.append("no activation module in the model, so every layer was initialised as if none "
                            "followed it; if its forward applies activations as functions (F.relu, torch.tanh), "
                            "pass example_input=<one batch> so that one forward pass finds them")
    follows = by_registration(model, set(layers))
    if example_input is not None:
        follows.update(by_execution(model, set(layers), example_input))  # also materialises lazy layers
    _refuse_lazy(model)
    aliases: dict[int, list[str]] = {}  # a tied weight is one tensor under several names
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    done: dict[int, InitRow | None] = {}  # tied weights drawn so far, by tensor: once, for the first layer
    layer_weights = {_full(n, "weight") for n, layer in layers.items() if not isinstance(layer, tuple(_GATES))}
    for name, m in layers.items():
        if _frozen(m):
            report.notes.append(f"{name}: left alone: frozen (requires_grad=False), so a new draw could never "
                                "be trained (pretrained weights would be lost); unfreeze it first to initialise it")
            continue
        if isinstance(m, tuple(_GATES)):
            _init_recurrent(name, m, scheme, report)
        elif not _skip_frozen(name, m, "weight", report):
            _init_tied_feedforward(name, m, scheme, follows.get(name, NONE), report, aliases, done, layer_weights)
        _zero_biases(name, m, report)
    return report


__all__ = ["init_", "InitReport", "InitRow", "check_constant_init", "SCHEMES"]
