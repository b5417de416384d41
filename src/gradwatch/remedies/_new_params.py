"""The parameters a change to a model added, given to an optimizer already built: each joins the
group that holds the layer it goes with, where an optimizer built after the change would hold it.
Shared by `gw.modify`'s `optimizer=` (the printed change of a combination, pasted after the
optimizer is built) and fix's trials (inject.py), so the two train alike."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Before(NamedTuple):
    """The model before a change: its modules by name (every place) and its parameter ids."""

    modules: dict[str, nn.Module]
    kept: set[int]


def before_change(model: nn.Module) -> Before:
    """Taken before the change. (Holding the old modules keeps their parameters alive, so no new
    parameter can be given a replaced one's id.)"""
    return Before(dict(model.named_modules(remove_duplicate=False)), {id(p) for p in model.parameters()})


def added_parameters(model: nn.Module, before: Before) -> list[tuple[torch.Tensor, list[int]]]:
    """Each trainable parameter a change added to `model`, with the ids of the layer it goes with:
    an optimizer that trains that layer trains it too, as one built after the change would."""
    out, seen = [], set(before.kept)
    for name, module in model.named_modules(remove_duplicate=False):
        new = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in new)
        if new:
            layer = _layer_of(model, name, before)
            out += [(p, layer) for p in new]
    return out


def _layer_of(model: nn.Module, name: str, before: Before) -> list[int]:
    """The kept parameter ids (the weight first) of the layer the new module at `name` goes with:
    the module it replaced there (an RNN's GRU), else the one right before it in its parent (the
    layer a norm follows, in an nn.Sequential or a `Normalised` pair); else the same for its
    parent, up to the whole model."""
    while name:
        parent_name, _, attr = name.rpartition(".")
        children = model.get_submodule(parent_name)._modules
        keys = list(children)
        earlier = children[keys[keys.index(attr) - 1]] if keys.index(attr) > 0 else None
        for layer in (before.modules.get(name), earlier):
            ids = [id(p) for p in layer.parameters() if id(p) in before.kept] if layer is not None else []
            if ids:
                return ids
        name = parent_name
    return [id(p) for p in model.parameters() if id(p) in before.kept]


def give_added(optimizers: list[torch.optim.Optimizer], added: list[tuple[torch.Tensor, list[int]]],
               model: set[int] = frozenset()) -> list[tuple[int, int, torch.Tensor]]:
    """Each added parameter where an optimizer built after the change would have it: in every
    optimizer that holds its whole layer (a fine-tuning's optimizer of the whole model beside a
    head's), or, the layer split over several (matrices in Muon or SGD, vectors in AdamW), in the one
    that holds its kind (as many dimensions: a norm's vectors, a GRU's matrices); in the group of a
    layer parameter of its kind, else of any parameter of its kind (the usual split's no-decay group,
    for a norm after a Linear without bias), else of the layer's first. Where no optimizer holding
    the layer holds its kind (Muon alone holds a bias-free layer), in one of `model`'s (its
    parameter ids) that does. Not to an optimizer that holds none of the model's layer (a head-only
    optimizer would train a frozen body's norms); not as a group of its own (it would lack the lr
    and the keys a scheduler keeps per group); not one any of them holds already. Returns
    (optimizer index, group index, parameter) for each one given."""
    held: dict[int, list[tuple[int, int]]] = {}  # parameter id -> (optimizer, group) holding it
    for o, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):
            for q in group["params"]:
                held.setdefault(id(q), []).append((o, g))
    given = []
    for p, layer in added:
        if id(p) in held:
            continue
        layer_in = {}  # optimizer -> the layer's ids it holds, in layer order
        for i in layer:
            for o, _ in held.get(i, []):
                layer_in.setdefault(o, []).append(i)
        if not layer_in:
            continue
        kinds = [o for o in layer_in if _group_of_kind(optimizers[o], p) is not None]
        everywhere = {i for ids in layer_in.values() for i in ids}
        whole = [o for o in layer_in if set(layer_in[o]) == everywhere]
        if whole:  # each that trains the whole layer; of them, those that hold its kind
            targets = [o for o in whole if o in kinds] or whole
        else:  # the layer split: the one that holds its kind
            targets = sorted(layer_in, key=lambda o: (o not in kinds, o))[:1]
        if not any(o in kinds for o in targets):
            others = [o for o, opt in enumerate(optimizers) if o not in layer_in and _group_of_kind(opt, p) is not None
                      and any(id(q) in model for group in opt.param_groups for q in group["params"])]
            targets = others[:1] or targets
        for o in sorted(set(targets)):
            g = _group(optimizers[o], p, layer_in.get(o, []), held)
            optimizers[o].param_groups[g]["params"].append(p)
            held.setdefault(id(p), []).append((o, g))
            given.append((o, g, p))
    for o in {o for o, _, _ in given}:
        _forget_flat_history(optimizers[o])
    return given


def _group(optimizer: torch.optim.Optimizer, p: torch.Tensor, layer: list[int],
           held: dict[int, list[tuple[int, int]]]) -> int:
    """The group of `optimizer` (its index) for `p`: that of a `layer` parameter of its kind, else
    of any parameter of its kind, else of the layer's first."""
    params = {id(q): (g, q) for g, group in enumerate(optimizer.param_groups) for q in group["params"]}
    same = [params[i][0] for i in layer if i in params and params[i][1].dim() == p.dim()]
    if same:
        return same[0]
    if (kind := _group_of_kind(optimizer, p)) is not None:
        return kind
    return params[layer[0]][0] if layer and layer[0] in params else 0


def _group_of_kind(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> int | None:
    """The first group of `optimizer` holding a parameter with as many dimensions as `p`."""
    return next((g for g, group in enumerate(optimizer.param_groups) if any(q.dim() == p.dim() for q in group["params"])),
                None)


def _forget_flat_history(optimizer: torch.optim.Optimizer) -> None:
    """An optimizer that keeps its parameters as one flat vector (LBFGS: `_numel_cache`, and a
    history of directions that long) starts its history anew once they change: sized to the old
    vector, it crashed at the next step. Its state's dicts are kept, emptied of the history: given
    inside its own step(closure) (a trial's change at the first forward), LBFGS writes on into the
    dict it holds, and a new one started it over at every step."""
    if hasattr(optimizer, "_numel_cache"):
        optimizer._numel_cache = None
        for state in optimizer.state.values():
            for key in FLAT_HISTORY:
                state.pop(key, None)
            if "n_iter" in state:
                state["n_iter"] = 0  # (its next iteration is a first one: no direction, no memory)


FLAT_HISTORY = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss", "al")


def drop(optimizer: torch.optim.Optimizer, gone: set[int]) -> int:
    """Take the parameters a change removed from the model (a replaced RNN's) out of `optimizer`,
    with their state: they get no gradient any more. Each group stays, a scheduler counts them.
    The lists are changed in place (LBFGS holds its group's)."""
    dropped = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in gone:
                optimizer.state.pop(p, None)
                dropped += 1
        g["params"][:] = [p for p in g["params"] if id(p) not in gone]
    if dropped:
        _forget_flat_history(optimizer)
    return dropped
