"""One recorded forward pass: which layers ran, in what order, with which input and output tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from gradwatch.collect.layers import RECURRENT, Layer, discover
from gradwatch.remedies._activations import _FUNCTIONS as ACTIVATION_FUNCS


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module's arguments or output: a tensor, or inside a tuple, list, dict
    or dataclass."""
    return next(tensors_in(obj), None)


def output_tensor(out: Any) -> torch.Tensor | None:
    """The model output a loss is taken of: its first tensor that requires grad (not a detached
    scalar or a step counter returned before the logits), else its first tensor."""
    return next((t for t in tensors_in(out) if t.requires_grad), first_tensor(out))


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple, list, dict or dataclass output, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict):
        yield from tensors_in(list(obj.values()))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        yield from tensors_in([getattr(obj, f.name) for f in dataclasses.fields(obj)])


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
    drops: list["Call"] = field(default_factory=list)  # dropout calls (train mode) that follow it


class Recorder:
    """Forward pre/post hooks on every layer of `model` (collect.layers' notion of a layer) while in
    the `with` block; in-place activations are made out-of-place meanwhile, so that a layer's output
    keeps its own gradient. Everything is restored on exit."""

    def __init__(self, model: nn.Module, cells: Iterable[str | nn.Module] = ()):
        self.model = model
        cell_ids = {id(model.get_submodule(c)) if isinstance(c, str) else id(c) for c in cells}
        self.cell_ids = cell_ids | {id(m) for m in model.modules() if isinstance(m, nn.RNNCellBase)}
        inside_cells = {id(sub) for m in model.modules() if id(m) in self.cell_ids for sub in m.modules() if sub is not m}
        layers = [x for x in discover(model, "", set(), set()) if id(x.module) not in inside_cells]
        self.layers = _merge_parametrizations(model, layers)
        named = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
        # A bare weight (a ParameterList entry, a root module's own parameter: collect.layers names it by
        # its key) has no output of its own: it is reported with ‖∂L/∂W‖ only, never hooked.
        self.weights = [x for x in self.layers if x.name != named[id(x.module)]]
        self.layers = [x for x in self.layers if x.name == named[id(x.module)]]
        self.calls: list[Call] = []
        self._handles: list = []
        self._inplace: list[nn.Module] = []
        self._open: dict[int, list[Call]] = {}  # calls whose forward has started, not finished
        self._spy = _PoolSpy(self)

    def __enter__(self) -> "Recorder":
        named = {id(m): n for n, m in self.model.named_modules()}
        roles = {id(layer.module): layer for layer in self.layers}
        for cid in self.cell_ids - set(roles):  # a parameter-free custom cell
            module = next(m for m in self.model.modules() if id(m) == cid)
            roles[cid] = Layer(named[cid], module, "cell", "")
        for name, m in self.model.named_modules():
            if _global_average(m) and id(m) not in roles:
                roles[id(m)] = Layer(name, m, "pool", "")
            if _dropout(m) and id(m) not in roles:
                roles[id(m)] = Layer(name, m, "dropout", "")
        for layer in roles.values():
            role = "cell" if id(layer.module) in self.cell_ids else layer.role
            self._handles.append(layer.module.register_forward_pre_hook(self._pre(layer, role)))
            self._handles.append(layer.module.register_forward_hook(self._post()))
        for m in self.model.modules():
            if isinstance(getattr(m, "inplace", None), bool) and m.inplace:
                m.inplace = False
                self._inplace.append(m)
        self._spy.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._spy.__exit__(None, None, None)
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
        """Bare weights (role "weights", no call: first, in registration order), then parameter-owning
        and recurrent calls in forward order, each with the activation calls that ran after it and
        before the next one. A parameter module that never ran (MultiheadAttention's
        out_proj, whose weights are used functionally) lends its parameters to its nearest ancestor
        that did."""
        entries = [Call(x.name, x.module, "weights", "", list(x.params)) for x in self.weights]
        for call in self.calls:  # appended as each call starts: forward order
            if call.role in ("param", "recurrent"):
                entries.append(call)
            elif call.role == "activation" and entries:
                entries[-1].acts.append(call)
            elif call.role == "dropout" and entries:
                entries[-1].drops.append(call)
        ran = {id(c.module) for c in self.calls}
        for layer in self.layers:
            if layer.role == "activation" or id(layer.module) in ran or not layer.params:
                continue
            owners = [c for c in entries if c.params and c.role != "weights" and layer.name.startswith(c.name + ".")]
            if owners:
                max(owners, key=lambda c: len(c.name)).params.extend(layer.params)
        return entries

    def head_pool(self) -> tuple[int, float] | None:
        """(index in `calls`, positions averaged) of the model's head pooling: the last global average
        pool after which no layer has more than one position per sample. None without one."""
        pools = [i for i, c in enumerate(self.calls) if c.role == "pool" and c.inp is not None and c.out is not None]
        if not pools:
            return None
        i = pools[-1]
        later = [c.out for c in self.calls[i + 1:] if c.role in ("param", "recurrent") and c.out is not None]
        if any(t.dim() >= 3 and t[0, 0].numel() > 1 for t in later):
            return None  # a squeeze-and-excitation pool on a side branch, not the head
        return i, self.calls[i].inp.numel() // max(self.calls[i].out.numel(), 1)

    def cells(self) -> list[Call]:
        return [c for c in self.calls if c.role == "cell"]

    def recurrent(self) -> list[Call]:
        return [c for c in self.calls if c.role == "recurrent" and isinstance(c.module, RECURRENT)]


def _merge_parametrizations(model: nn.Module, layers: list[Layer]) -> list[Layer]:
    """torch.nn.utils.parametrize keeps a parametrized weight's original tensors in a
    `<module>.parametrizations.<name>` ParametrizationList, which runs when the weight is read: its
    parameters belong to the module that reads it (one layer), not to a layer of their own."""
    by_name = {x.name: x for x in layers}
    out = []
    for x in layers:
        if not isinstance(x.module, parametrize.ParametrizationList):
            out.append(x)
            continue
        owner_name = x.name.rpartition(".parametrizations.")[0]
        owner = by_name.get(owner_name or type(model).__name__)
        if owner is not None:
            owner.params.extend(x.params)
            continue
        module = model.get_submodule(owner_name)  # e.g. a Linear(bias=False): no parameter of its own left
        by_name[owner_name] = Layer(owner_name or type(model).__name__, module, "param", "", list(x.params))
        out.append(by_name[owner_name])
    return out


POOL_FUNCS = {"mean", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
              "avg_pool1d", "avg_pool2d", "avg_pool3d"}


class Functional(nn.Module):
    """An activation the forward calls as a function (`F.relu(self.fc(x))`), as a module: what the
    table, the activation statistics and the mean field (which evaluates φ and φ' through it) read.
    Made by the recorder only; never put into the user's model."""

    def __init__(self, func: Any, extra: tuple = (), kwargs: dict | None = None):
        super().__init__()
        self.func, self.extra, self.kw = func, extra, dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.func(x, *self.extra, **self.kw)


class _PoolSpy(TorchFunctionMode):
    """Records functional global average pools (`x.mean((2, 3))`, `F.adaptive_avg_pool2d(x, 1)`,
    `F.avg_pool2d(x, 4)` on a 4×4 map, a token mean `x.mean(1)` of (B, T, C)) as "pool" calls, in
    forward order, as the module hooks record nn.AdaptiveAvgPool2d(1); and activations called as
    functions on a layer's output (`F.relu(self.fc(x))`, `torch.tanh(...)`, outside every recorded
    module) as "activation" calls, as the hooks record nn.ReLU. Nothing is changed: the function runs
    as it would."""

    def __init__(self, rec: "Recorder"):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in POOL_FUNCS and args and _is_global_average(func.__name__, args[0], out):
            self.rec.calls.append(Call(func.__name__, None, "pool", "", [], args, args[0], out, out))
        elif func in ACTIVATION_FUNCS and args and self._on_layer_output(args[0], out):
            name = ACTIVATION_FUNCS[func](args, kwargs or {}).name
            act = Functional(func, tuple(args[1:]), kwargs)
            self.rec.calls.append(Call(getattr(func, "__name__", name), act, "activation", name, [], args, args[0], out, out))
        return out

    def _on_layer_output(self, x: Any, out: Any) -> bool:
        """`x` is the output of the last layer that ran, no recorded module is running (nn.ReLU's own
        torch.relu is its business), and the call is not in place (its output is a new tensor)."""
        if not isinstance(x, torch.Tensor) or out is x or any(self.rec._open.values()):
            return False
        last = next((c for c in reversed(self.rec.calls) if c.role in ("param", "recurrent", "activation")), None)
        return last is not None and (last.out is x) and last.role != "activation"


def _is_global_average(name: str, x: Any, y: Any) -> bool:
    """A mean over every position of each sample's channels: the batch dimension and one channel
    dimension (dim 1, as N,C,H,W, or the last, as N,T,C) kept, everything else averaged. A mean over
    the last dimension with keepdim (a hand-written LayerNorm/RMSNorm's statistics) is not one."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.dim() < 3 or y.dim() < 1:
        return False
    if y.shape[0] != x.shape[0] or y.numel() == 0 or x.numel() // y.numel() < 2:
        return False
    channels = y[0].numel()
    if channels < 2 or channels not in (x.shape[1], x.shape[-1]):
        return False
    norm_stat = name == "mean" and y.dim() == x.dim() and y.shape[-1] == 1 < x.shape[-1]
    return not norm_stat


def _dropout(m: nn.Module) -> bool:
    """Inverted dropout that is on (train mode, p > 0): each kept unit is scaled by 1/(1−p), which
    multiplies a squared norm by 1/(1−p) on average, forward and back. Alpha dropout keeps the
    variance instead and is left out."""
    return (isinstance(m, nn.modules.dropout._DropoutNd) and m.training and 0 < m.p < 1
            and not isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout)))


def _global_average(m: nn.Module) -> bool:
    """nn.AdaptiveAvgPool1d/2d/3d to a single position: a mean over every position of each channel."""
    if not isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return False
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
    return all(d == 1 for d in size)
