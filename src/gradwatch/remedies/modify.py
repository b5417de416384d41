"""gw.modify: model changes that fix gradient flow, each returning the model and what changed.

* `swap_activations`: replace saturating activations (e.g. Sigmoid, whose derivative is at most
  1/4) by non-saturating ones (default LeakyReLU(0.01), which keeps a gradient for x < 0 too).
* `insert_norm`: BatchNorm (Ioffe & Szegedy 2015) or LayerNorm (Ba et al. 2016) after each
  Linear/Conv layer, before its activation, so every layer sees inputs of a steady scale.
* `add_residual`: wrap shape-preserving blocks as x + f(x) (He et al. 2016), so the gradient has
  an identity path through every block.
* `replace_rnn`: a vanilla nn.RNN by a GRU (Cho et al. 2014) of the same shape: its gated,
  additive state update keeps the gradient through time that tanh/ReLU recurrences lose or blow up.
  A GRU takes and returns what an RNN does (output, h_n), so the forward that calls it is unchanged.

All change the model in place (pass ``inplace=False`` for a changed deep copy) and leave the
parameter names of untouched layers as they were. Only modules are changed: activations called
as functions in a forward (F.sigmoid) cannot be swapped from outside (given `example_input`,
`swap_activations` counts them in its description).

Names of changed layers. A layer inside an nn.Sequential gets its norm as a new sibling named
``"<name>_bn"`` / ``"<name>_ln"`` right after it, so even its own parameter names stay the same;
elsewhere (a layer held as an attribute and called in a custom forward) it is replaced by
``nn.Sequential(layer, norm)`` and its names gain ``.0`` (``fc.weight`` -> ``fc.0.weight``).
A block wrapped as residual gains ``.fn`` (``2.weight`` -> ``2.fn.weight``). Every rename is listed
in ``Change.renamed``; the parameter objects are the same, so an existing optimizer keeps
working, but new parameters (norm layers) are not in it: ``Change.new_parameters`` lists them.
Pass ``optimizer=`` (one or several) to the changes that add parameters and each new parameter
joins the group of the layer it goes with (`give_added`), as if the optimizer had been built after.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import nn

from gradwatch.errors import ConfigError
from gradwatch.remedies._activations import functional_calls, reaching_output
from gradwatch.remedies._common import forward_once, shown
from gradwatch.remedies._new_params import Before, added_parameters, before_change, drop, give_added

ModuleTypes = Union[type, tuple]
Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None]


@dataclass
class Change:
    """What a modification did: one sentence, the modules affected, parameter renames, new parameters."""

    description: str
    modules: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    new_parameters: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.modules)

    def __str__(self) -> str:
        return self.description


def _renest(state_dict: dict, prefix: str, wrapper: nn.Module, step: str) -> None:
    """A checkpoint saved before a wrap names the wrapped module's tensors `prefix + name`; the wrapper
    holds them at `prefix + step + name`: renamed in place, so the old checkpoint loads. Every key under
    the wrapper that is not one of its own is moved down one level, so wrappers that stack (insert_norm,
    then add_residual inside it) each peel theirs as the load walks down; matched against the inner
    module's names, which the inner wrap had changed already, the outer one moved nothing and the
    checkpoint silently did not load."""
    own = set(wrapper.state_dict(keep_vars=True))
    inner = [k for k in own if k.startswith(step)]
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        new = prefix + step + rest
        if rest not in own and new not in state_dict and any(k == step + rest or k.endswith("." + rest) for k in inner):
            state_dict[new] = state_dict.pop(key)


class Residual(nn.Module):
    """x + fn(x): an identity path around a shape-preserving block. Loads a state_dict saved before
    the wrap (the block's tensors without `.fn`)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        _renest(state_dict, prefix, self, "fn.")
        super()._load_from_state_dict(state_dict, prefix, *args)


class FeatureBatchNorm(nn.BatchNorm1d):
    """BatchNorm of a Linear layer's output features, which are its last dim: nn.BatchNorm1d takes
    dim 1 for the features, so on a (batch, time, features) output it would normalise over time.
    Statistics per feature over every other position; state_dict as nn.BatchNorm1d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class Normalised(nn.Sequential):
    """nn.Sequential(layer, norm) for a layer held as an attribute, which passes every argument to the
    layer: a plain Sequential takes one input, and nn.Bilinear's forward takes two."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layer, *rest = self
        x = layer(*args, **kwargs)
        for m in rest:
            x = m(x)
        return x

    def __getattr__(self, name: str) -> Any:
        """What the layer has and the wrapper has not, the layer's: a script's forward that reads
        `self.rec.out_features` (or `.weight`) ran on, where it raised AttributeError and failed
        a tester's BatchNorm trial."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or not modules or "0" not in modules:
                raise
            return getattr(modules["0"], name)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """A state_dict saved before the change (the layer's tensors without `.0`) loads too; only the
        new norm's tensors are missing from it."""
        _renest(state_dict, prefix, self, "0.")
        super()._load_from_state_dict(state_dict, prefix, *args)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = _parent(model, name)
    setattr(parent, attr, module)


def _names(model: nn.Module) -> dict[int, str]:
    """Parameter id -> its name; a parameter held in several places by the first, as named_parameters()."""
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names


def _renames(before: dict[int, str], model: nn.Module) -> tuple[dict[str, str], list[str]]:
    after = _names(model)
    renamed = {before[i]: n for i, n in after.items() if i in before and before[i] != n}
    new = [n for i, n in after.items() if i not in before]
    return renamed, new


def _optimizer_list(optimizer: Optimizers, inplace: bool) -> list[torch.optim.Optimizer]:
    """`optimizer=` as a list, checked before the model changes."""
    if optimizer is None:
        return []
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in opts:
        if not isinstance(getattr(o, "param_groups", None), list):
            raise ConfigError(f"optimizer={shown(o)} is not a torch optimizer (no param_groups); pass the "
                              "optimizer that trains the model, or a list of them")
    if opts and not inplace:
        raise ConfigError("optimizer= with inplace=False: the copy's new parameters go with layers no optimizer "
                          "holds (it holds the original's); change the model in place, or build an optimizer "
                          "for the copy")
    return opts


def _give(model: nn.Module, before: Before, optimizers: list[torch.optim.Optimizer], new: list[str],
          replaced: bool = False) -> str:
    """Give `optimizers` the parameters the change added (and take out those it removed); the note
    for the Change: what an optimizer built before the change misses, when none was given."""
    if not optimizers:
        return _optimizer_note(new, replaced)
    if not new:
        return ""
    added = added_parameters(model, before)
    given = len({id(p) for _, _, p in give_added(optimizers, added, before.kept)})
    now = {id(p) for p in model.parameters()}
    dropped = sum(drop(opt, before.kept - now) for opt in optimizers)
    if given == len(added):
        note = f"; its {len(added)} new parameter(s) joined the optimizer, each in its layer's group"
    else:  # a frozen body's norms: an optimizer built after the change on the same layers lacks them too
        note = (f"; {given} of its {len(added)} new parameter(s) joined the optimizer, each in its layer's "
                f"group; the other {len(added) - given} go with layers no optimizer given trains, "
                "and stay untrained")
    return note + (f"; {dropped} parameter(s) of the replaced module left it" if dropped else "")


class Place(NamedTuple):
    """Where a module sits: its name there, and the parent attribute holding it."""

    name: str
    parent: nn.Module
    attr: str
    module: nn.Module


def _places(model: nn.Module, wanted: Callable[[nn.Module], bool]) -> list[Place]:
    """Every place a wanted module sits, each parent's slot once: named_modules() lists a module
    registered under two names (``self.dec = self.enc``) only under the first, and a change made at
    that name alone would end the sharing."""
    seen: set[tuple[int, str]] = set()
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        if name and wanted(m):
            parent, attr = _parent(model, name)
            if (id(parent), attr) not in seen:
                seen.add((id(parent), attr))
                out.append(Place(name, parent, attr, m))
    return out


def _target(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={type(model).__name__} is not a torch.nn.Module; pass the model itself")
    return model if inplace else copy.deepcopy(model)


def _types(name: str, value: Any) -> tuple:
    types = value if isinstance(value, tuple) else (value,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ConfigError(f"{name}={value!r} must be an nn.Module class or a tuple of them, e.g. nn.Sigmoid")
    return types


LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def swap_activations(model: nn.Module, old: ModuleTypes = nn.Sigmoid,
                     new: Callable[[], nn.Module] = lambda: nn.LeakyReLU(0.01),
                     *, keep_output: bool = False, example_input: Any = None,
                     inplace: bool = True, optimizer: Optimizers = None) -> tuple[nn.Module, Change]:
    """Replace every module of type `old` by a fresh `new()` (a class or a factory).

    `keep_output` leaves the output's activation alone (a sigmoid giving BCELoss its probabilities
    shapes the prediction; it is no hidden layer whose gradient flow needs fixing): with
    `example_input`, the `old` module that one forward pass applies after the last Linear/Conv
    layer; without, one registered after it (a module shared by every layer but registered last
    is taken for the output's then). `optimizer`: one or several, given the new activations'
    parameters (a PReLU's slopes), each in the group of the layer before it."""
    old_types = _types("old", old)
    new = _factory(new)
    optimizers = _optimizer_list(optimizer, inplace)
    model = _target(model, inplace)
    snapshot = before_change(model)
    # every place a module sits, also one instance registered twice (named_modules() lists it once)
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n]
    before = _names(model)
    output = _output_activations(model, named, old_types, example_input) if keep_output else set()
    swapped, made = [], None
    for name, m in named:
        if isinstance(m, old_types) and name not in output:
            try:
                made = new()
            except TypeError as exc:  # nn.Linear, or a factory that needs arguments: say which argument
                raise ConfigError(f"new={getattr(new, '__name__', None) or shown(new)} could not be built with no "
                                  f"arguments ({exc}); pass a class that needs none (nn.GELU), an instance "
                                  "(nn.LeakyReLU(0.1)) or a factory (lambda: nn.LeakyReLU(0.1))") from None
            if not isinstance(made, nn.Module):
                raise ConfigError(f"new() returned {made!r}, not an nn.Module; pass e.g. lambda: nn.LeakyReLU(0.01)")
            _set(model, name, _placed_like(made, m, _parent(model, name)[0], model))
            _refresh_fast_path(model, name)
            swapped.append(name)
    old_name = "/".join(t.__name__ for t in old_types)
    functional = _functional_note(model, example_input, old_types, keep_output)
    if not swapped:
        kept = f" but the output's ({', '.join(sorted(output))}), kept" if output else " found"
        if example_input is None and not output:  # a forward calling torch.sigmoid(x) has no module to find
            functional = ("; if the forward applies it as a function (torch.sigmoid(x), F.relu(x)), no module swap "
                          "reaches it: pass example_input=<one batch> to count those calls, and replace them by hand")
        return model, Change(f"no {old_name} module{kept}; nothing changed{functional}")
    renamed, new_params = _renames(before, model)  # a PReLU brings parameters of its own
    return model, Change(f"replaced {len(swapped)} {old_name} module(s) by {made!r}: {', '.join(swapped)}"
                         + functional + _give(model, snapshot, optimizers, new_params), swapped, renamed, new_params)


def _placed_like(made: nn.Module, *near: nn.Module) -> nn.Module:
    """`made` on the device and floating dtype of the first of `near` (the module it replaces, its
    parent, the model) that holds a floating tensor: a new PReLU is built in float32 on the CPU, and
    its slope would not multiply a float64, bfloat16 or GPU activation ("prelu: Type promoting not
    supported")."""
    own = [t for t in (*made.parameters(), *made.buffers()) if t.is_floating_point()]
    for module in near if own else ():
        ref = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
        if ref is not None:
            return made.to(device=ref.device, dtype=ref.dtype)
    return made


def _functional_note(model: nn.Module, example_input: Any, old_types: tuple, keep_output: bool) -> str:
    """What the swap could not reach: the same activation called as a function in a forward, found
    by a forward pass of `example_input` (without one, a hint to pass it when no module was found)."""
    if example_input is None:
        return ""
    calls = functional_calls(model, example_input, old_types)
    if not calls:
        return ""
    counts = ", ".join(f"{calls.count(n)} call(s) of {n}" for n in dict.fromkeys(calls))
    return (f"; the forward also applies it as a function ({counts}), which no module swap reaches: "
            "replace those in the forward by hand" + (" (but the output's)" if keep_output else ""))


def _factory(new: Any) -> Callable[[], nn.Module]:
    """`new` as a factory of fresh modules. A module instance (``new=nn.LeakyReLU(0.1)``) is copied
    for each place, as a class or a lambda would make one each: calling the instance itself would
    run its forward with no input."""
    if isinstance(new, nn.Module):
        return lambda: copy.deepcopy(new)
    if not callable(new):
        raise ConfigError(f"new={new!r} is not an nn.Module class, instance or factory; "
                          "pass e.g. nn.GELU, nn.LeakyReLU(0.01) or lambda: nn.LeakyReLU(0.01)")
    return new


def _optimizer_note(new: list[str], replaced: bool = False) -> str:
    """What an optimizer built before the change misses: the new parameters (and, for a replaced
    module, it still holds the old ones, which no longer take part in the forward)."""
    if not new:
        return ""
    if replaced:
        return (f"; an optimizer built before the change lacks its {len(new)} new parameter(s) "
                "(change.new_parameters) and still holds the replaced module's, which the forward no longer "
                "uses: build the optimizer again, or pass optimizer=<it> to this call")
    return (f"; an optimizer built before the change lacks its {len(new)} new parameter(s) "
            "(change.new_parameters): build it again, pass it to this call (optimizer=: each joins the group of "
            "its layer), or add them with optimizer.add_param_group("
            "{'params': [dict(model.named_parameters())[n] for n in change.new_parameters]})")


def _output_activations(model: nn.Module, named: list[tuple[str, nn.Module]], old_types: tuple,
                        example_input: Any) -> set[str]:
    """The places of the output's `old` activations. With `example_input`, from a forward pass of
    it (what runs decides, not where it is declared): each module whose output reaches the model's
    output through no layer (a probability head that another head runs after: swapped, its BCE
    raised on values outside [0, 1]), and each applied after the last layer. Else the last `old`
    module registered after the last layer."""
    if example_input is None:
        last_layer = max((i for i, (_, m) in enumerate(named) if isinstance(m, LAYERS)), default=-1)
        after = [n for n, m in named[last_layer + 1:] if isinstance(m, old_types)]
        return {after[-1]} if last_layer >= 0 and after else set()
    order = _run_order(model, example_input)
    last_layer = max((i for i, m in enumerate(order) if isinstance(m, LAYERS)), default=-1)
    applied = {id(m) for m in order[last_layer + 1:] if isinstance(m, old_types)} if last_layer >= 0 else set()
    reached = reaching_output(model, example_input, LAYERS, kinds=old_types)
    applied |= {id(m) for n, m in model.named_modules() if n in reached}
    return {n for n, m in named if id(m) in applied}


def _run_order(model: nn.Module, example_input: Any) -> list[nn.Module]:
    """Every module call of one forward pass, in order (a module shared by several layers each time)."""
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda module, args: order.append(module)) for m in model.modules()]
    try:
        forward_once(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return order


def _refresh_fast_path(model: nn.Module, name: str) -> None:
    """nn.TransformerEncoderLayer picks its fused kernel's activation (relu/gelu) when built: after a
    swap its eval fast path would still apply the old one. Tell it what it holds now."""
    parent, attr = _parent(model, name)
    if attr == "activation" and hasattr(parent, "activation_relu_or_gelu"):
        act = parent.activation
        parent.activation_relu_or_gelu = 1 if isinstance(act, nn.ReLU) else 2 if isinstance(act, nn.GELU) else 0


_BATCH_NORMS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
                nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d,
                nn.ConvTranspose3d: nn.BatchNorm3d}


def _norm_for(layer: nn.Module, kind: str) -> nn.Module:
    """A norm matching `layer`'s output, on its device and dtype: over its last dim after a Linear or
    Bilinear, over the channels (dim 1) after a conv or transposed conv (a DCGAN generator's
    ConvTranspose2d -> BatchNorm2d)."""
    w = getattr(layer, "weight", None)
    factory = {"device": w.device, "dtype": w.dtype} if isinstance(w, torch.Tensor) else {}
    if isinstance(layer, (nn.Linear, nn.Bilinear)):
        n = layer.out_features
        return FeatureBatchNorm(n, **factory) if kind == "batch" else nn.LayerNorm(n, **factory)
    bn = next((b for cls, b in _BATCH_NORMS.items() if isinstance(layer, cls)), None)
    if bn is None:
        raise ConfigError(f"cannot choose a norm for {type(layer).__name__}: insert_norm knows the output layout of "
                          "Linear, Bilinear and (transposed) Conv1d/2d/3d layers; leave it out of after=")
    return nn.GroupNorm(1, layer.out_channels, **factory) if kind == "layer" else bn(layer.out_channels, **factory)


def _insert_after(seq: nn.Sequential, key: str, new_key: str, module: nn.Module) -> None:
    """Put `module` into `seq` right after `key`, keeping every existing name."""
    items = list(seq._modules.items())
    seq._modules = OrderedDict()
    for k, v in items:
        seq._modules[k] = v
        if k == key:
            seq._modules[new_key] = module


# torch blocks that read their children's weights directly (F.multi_head_attention_forward, the
# fused fast path): a child wrapped with a norm would break them, so none is inserted inside.
FUSED = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _normalised(place: Place) -> bool:
    """The layer's next sibling in its nn.Sequential is a norm already (conv -> BatchNorm2d -> ReLU)."""
    if not isinstance(place.parent, nn.Sequential):
        return False
    keys = list(place.parent._modules)
    at = keys.index(place.attr) + 1
    return at < len(keys) and isinstance(place.parent._modules[keys[at]], NORMS)


def _attach_norms(places: list[Place], kind: str) -> None:
    """A norm after the layer at each place: in an nn.Sequential as a sibling, elsewhere as
    nn.Sequential(layer, norm). A layer in several places gets the same norm in each (and the same
    Sequential), so what was one module stays one."""
    suffix = "_bn" if kind == "batch" else "_ln"
    made: dict[int, tuple[nn.Module, nn.Sequential]] = {}  # layer -> its norm, and layer + norm
    for _, _, _, layer in places:  # every norm first: a layer it cannot normalise leaves the model untouched
        if id(layer) not in made:
            norm = _norm_for(layer, kind)
            made[id(layer)] = (norm, Normalised(layer, norm))
    for _, parent, attr, layer in places:
        norm, both = made[id(layer)]
        if isinstance(parent, nn.Sequential) and attr + suffix not in parent._modules:
            _insert_after(parent, attr, attr + suffix, norm)
        else:
            setattr(parent, attr, both)


KNOWN_LAYOUTS = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)  # the layers `_norm_for` knows the output of
# insert_norm's default: every layer type whose output layout it knows, but nn.Bilinear (two inputs)
LAYERS_TO_NORMALISE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                       nn.ConvTranspose3d)


def insert_norm(model: nn.Module, kind: str = "batch", after: ModuleTypes = LAYERS_TO_NORMALISE,
                *, skip_last: bool = True, example_input: Any = None, inplace: bool = True,
                optimizer: Optimizers = None) -> tuple[nn.Module, Change]:
    """Insert BatchNorm (`kind="batch"`) or LayerNorm (`"layer"`) after each layer of type `after`
    (every Linear and conv by default: a Conv1d net or a ConvTranspose2d decoder, left out of the
    default before, got "nothing changed" from the remedy diagnose and the probe give for all models).

    `skip_last` leaves the output layers, whose scale is the prediction's, without a norm: with
    `example_input` (a batch the model takes), each layer whose output reaches the model's output
    through no other such layer, found by one forward pass (every head of a two-head model, an
    output layer declared before the hidden ones); without it, the last such layer in registration
    order. Layers inside attention and transformer blocks (`FUSED`) are left as they are: those
    blocks use their weights directly.

    `optimizer` (one or several, already built): each norm's parameters join the group that holds
    the layer it follows, so the change can be made after the optimizer is built.
    """
    if kind not in ("batch", "layer"):
        raise ConfigError(f"kind={kind!r} must be 'batch' (BatchNorm) or 'layer' (LayerNorm)")
    after_types = _types("after", after)
    unknown = [t.__name__ for t in after_types if not issubclass(t, KNOWN_LAYOUTS)]
    if unknown:  # (checked before any forward: a type whose places were all output layers went unsaid)
        raise ConfigError(f"after={', '.join(unknown)}: insert_norm knows the output layout of Linear, Bilinear and "
                          "(transposed) Conv1d/2d/3d layers only; leave it out of after=")
    optimizers = _optimizer_list(optimizer, inplace)
    model = _target(model, inplace)
    before, snapshot = _names(model), before_change(model)
    fused = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, FUSED)]

    def unfused(found: list[Place]) -> list[Place]:
        return [p for p in found if not any(p.name.startswith(f + ".") or not f for f in fused)]

    places = unfused(_places(model, lambda m: isinstance(m, after_types)))
    skipped = ""
    if skip_last and places:  # every place of an output layer, among all the layers (after= narrowed
        # to the convs left the last conv without a norm, the Linear after it being the output)
        every = (*LAYERS_TO_NORMALISE, nn.Bilinear, *after_types)
        outputs = _output_layers(model, unfused(_places(model, lambda m: isinstance(m, every))), every, example_input)
        kept = [p.name for p in places if id(p.module) in outputs]
        places = [p for p in places if id(p.module) not in outputs]
        skipped = ("" if not kept else
                   f" but the last, '{kept[-1]}' (skip_last=True keeps the output layer as it is; example_input= "
                   "finds the output layers by a forward pass)" if example_input is None else
                   f" but the output layer{'s' if len(kept) > 1 else ''}, {', '.join(repr(n) for n in kept)} "
                   "(skip_last=True keeps them as they are)")
    normalised = [p for p in places if _normalised(p)]
    places = [p for p in places if p not in normalised]
    if normalised:  # conv -> BatchNorm2d -> ReLU already: a second norm would only renormalise the first's output
        skipped += (f"{'; ' if skipped else ' but '}{', '.join(p.name for p in normalised)}, already followed by a "
                    "norm (left as they are)")
    _attach_norms(places, kind)
    layers = [p.name for p in places]
    renamed, new = _renames(before, model)
    if not layers:
        names = [t.__name__ for t in after_types]
        kinds = ("Linear or conv" if set(after_types) == set(LAYERS_TO_NORMALISE) else
                 " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}")
        return model, Change(f"no {kinds} layer to normalise{skipped}; nothing changed")
    what = "BatchNorm" if kind == "batch" else "LayerNorm"
    return model, Change(f"inserted {what} after {len(layers)} layer(s): {', '.join(layers)}"
                         + (f" (not after {', '.join(p.name for p in normalised)}: already followed by a norm)"
                            if normalised else "")
                         + (f" (renamed {len(renamed)} parameter(s))" if renamed else "")
                         + _give(model, snapshot, optimizers, new),
                         layers, renamed, new)


def _output_layers(model: nn.Module, places: list[Place], types: tuple, example_input: Any) -> set[int]:
    """The ids of the output layers among `places`: the layers of `types` whose output reaches the
    model's output through no other (`reaching_output`), else the last registered."""
    if example_input is None:
        return {id(places[-1].module)}
    modules = dict(model.named_modules())
    return {id(modules[name]) for name in reaching_output(model, example_input, types, kinds=types)}


def _shapes(model: nn.Module, example_input: Any) -> dict[str, bool]:
    """Module name -> True if its output has the shape of its (single tensor) input, from one forward."""
    same: dict[str, bool] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(m: nn.Module, args: tuple, out: Any) -> None:
            ok = (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                  and args[0].shape == out.shape)
            same[name] = same.get(name, True) and ok
        return record

    try:
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_hook(hook(name)))
        forward_once(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return same


# Norm layers keep the shape and have parameters, but x + norm(x) is no longer normalised (its
# scale is x's): they are no block to wrap.
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def add_residual(model: nn.Module, example_input: Any, blocks: list[str] | None = None,
                 *, inplace: bool = True) -> tuple[nn.Module, Change]:
    """Wrap shape-preserving blocks as ``Residual(block)``, computing x + block(x).

    Without `blocks`, every child of an nn.Sequential that has parameters and whose output shape
    equals its input shape on `example_input` is wrapped (parameter-free children such as
    activations are not: x + relu(x) adds no learnable path; nor are norm layers, `NORMS`). With `blocks`, exactly those module
    names are wrapped, and each must preserve the shape.
    """
    model = _target(model, inplace)
    same = _shapes(model, example_input)
    if blocks is None:
        chosen = [n for n, m in model.named_modules() if n and same.get(n)
                  and isinstance(_parent(model, n)[0], nn.Sequential) and any(True for _ in m.parameters())
                  and not isinstance(m, (Residual, *NORMS)) and not isinstance(_parent(model, n)[0], Residual)]
        # outermost only: a block inside a block already wrapped keeps its plain form
        chosen = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]
    else:
        if isinstance(blocks, str):  # one name, not its characters
            blocks = [blocks]
        names = dict(model.named_modules())
        for n in blocks:
            if n not in names:
                raise ConfigError(f"blocks contains {n!r}, which is not a module of the model; "
                                  "use names from model.named_modules()")
            if not same.get(n):
                raise ConfigError(f"block {n!r} changes the shape of its input (or did not run on "
                                  "example_input), so x + block(x) is undefined; pick shape-preserving blocks")
        chosen = list(blocks)
    before = _names(model)
    residuals = {id(m): Residual(m) for m in map(model.get_submodule, chosen)}
    places = _places(model, lambda m: id(m) in residuals)
    for _, parent, attr, m in places:  # one Residual wherever the block sits: a shared block stays shared
        setattr(parent, attr, residuals[id(m)])
    renamed, new = _renames(before, model)
    if not chosen:
        return model, Change("no shape-preserving block with parameters found in an nn.Sequential; nothing changed"
                             + _outside_sequential(model, same))
    names = [p.name for p in places]
    return model, Change(f"wrapped {len(residuals)} block(s) as residual x + f(x): {', '.join(names)}",
                         names, renamed, new)


def _outside_sequential(model: nn.Module, same: dict[str, bool]) -> str:
    """Shape-preserving layers that a forward of the model's own calls: not wrapped on their own, since
    only an nn.Sequential is sure to feed a block its own input, but named with the call that wraps them."""
    found = [n for n, m in model.named_modules() if n and same.get(n) and any(True for _ in m.parameters())
             and not isinstance(m, (Residual, *NORMS)) and not isinstance(_parent(model, n)[0], nn.Sequential)]
    found = [n for n in found if not any(n.startswith(o + ".") for o in found)]  # outermost only
    if not found:
        return ""
    shown_names = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return (f"; {len(found)} shape-preserving module(s) with parameters outside any nn.Sequential ({shown_names}) "
            f"are called by a forward of the model's own: wrap those you mean with add_residual(model, example_input, blocks={found[:2]!r})")


def replace_rnn(model: nn.Module, *, inplace: bool = True,
                optimizer: Optimizers = None) -> tuple[nn.Module, Change]:
    """Replace every vanilla nn.RNN by an nn.GRU of the same sizes, layers, direction and layout,
    on the same device and dtype, freshly initialised (torch's GRU default). The new module keeps
    the old one's name; its parameters are new (`Change.new_parameters`). `optimizer` (one or
    several, already built): each GRU's parameters join the group that held its RNN's, which leave."""
    optimizers = _optimizer_list(optimizer, inplace)
    model = _target(model, inplace)
    before, snapshot = _names(model), before_change(model)
    rnns = _places(model, lambda m: type(m) is nn.RNN)
    if type(model) is nn.RNN:
        raise ConfigError("the model is itself an nn.RNN; replace it by nn.GRU(...) where it is built")
    grus = {id(p.module): _gru_like(p.module) for p in rnns}
    for _, parent, attr, rnn in rnns:  # one GRU wherever the RNN sits: a shared RNN stays shared
        setattr(parent, attr, grus[id(rnn)])
    renamed, new = _renames(before, model)
    if not rnns:
        return model, Change("no nn.RNN found; nothing changed")
    names = [p.name for p in rnns]
    return model, Change(f"replaced {len(grus)} nn.RNN by nn.GRU of the same shape: {', '.join(names)}"
                         + _give(model, snapshot, optimizers, new, replaced=True), names, renamed, new)


def _gru_like(rnn: nn.RNN) -> nn.GRU:
    """A GRU taking and returning what `rnn` does, on its device and dtype."""
    w = rnn.weight_ih_l0
    return nn.GRU(rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias, batch_first=rnn.batch_first,
                  dropout=rnn.dropout, bidirectional=rnn.bidirectional, device=w.device, dtype=w.dtype)


from gradwatch.remedies.functional_swap import swap_functions  # noqa: E402  (it builds on Change above)
