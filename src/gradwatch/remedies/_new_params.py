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
    holding a layer parameter of its kind (as many dimensions: a norm's vectors, a GRU's
    matrices), else any parameter of its kind; in the group `_group` picks. Where Muon holds the
    whole layer (it steps matrices only) and the parameter is no matrix, in an optimizer of
    `model`'s (its parameter ids) holding its kind. Not to an optimizer that holds none of the
    layer (a head-only optimizer would train a frozen body's norms, at the head's lr); not as a
    group of its own (it would lack the lr and the keys a scheduler keeps per group); not one any
    of them holds already. Returns (optimizer index, group index, parameter) for each one given."""
    held: dict[int, list[tuple[int, int]]] = {}  # parameter id -> (optimizer, group) holding it
    for o, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):
            for q in group["params"]:
                held.setdefault(id(q), []).append((o, g))
    given, new = [], {id(p) for p, _ in added}
    for p, layer in added:
        if id(p) in held:
            continue
        layer_in: dict[int, list[int]] = {}  # optimizer -> the layer's ids it holds, in layer order
        for i in layer:
            for o, _ in held.get(i, []):
                layer_in.setdefault(o, []).append(i)
        if not layer_in:
            continue
        everywhere = {i for ids in layer_in.values() for i in ids}
        whole = [o for o in layer_in if set(layer_in[o]) == everywhere]
        if whole:
            targets = whole
        else:  # the layer split: the one holding a layer parameter of its kind, else any of its kind
            same = lambda o: any(_param(optimizers[o], i).dim() == p.dim() for i in layer_in[o])
            targets = sorted(layer_in, key=lambda o: (not same(o), _group_of_kind(optimizers[o], p) is None, o))[:1]
        if p.dim() < 2 and all(_steps_matrices_only(optimizers[o]) for o in targets):
            others = [o for o, opt in enumerate(optimizers) if o not in layer_in and _group_of_kind(opt, p) is not None
                      and any(id(q) in model for group in opt.param_groups for q in group["params"])]
            targets = others[:1] or targets
        for o in sorted(set(targets)):
            g = _group(optimizers[o], p, layer_in.get(o, []), new)
            optimizers[o].param_groups[g]["params"].append(p)
            held.setdefault(id(p), []).append((o, g))
            given.append((o, g, p))
    for o in {o for o, _, _ in given}:
        _forget_flat_history(optimizers[o])
    return given


def _param(optimizer: torch.optim.Optimizer, i: int) -> torch.Tensor:
    return next(q for group in optimizer.param_groups for q in group["params"] if id(q) == i)


def _steps_matrices_only(optimizer: torch.optim.Optimizer) -> bool:
    """Muon (torch's, or one of that name): it orthogonalises 2-D updates, and raised on a vector."""
    return any(cls.__name__ == "Muon" for cls in type(optimizer).__mro__)


def _group(optimizer: torch.optim.Optimizer, p: torch.Tensor, layer: list[int], new: set[int]) -> int:
    """The group of `optimizer` (its index) for `p`: that of a `layer` parameter of its kind; else
    the layer's own where it holds nothing else (per-layer lrs; `new`: the parameters being added,
    not counted); else, the group shared with other layers (a split by kind: decayed matrices,
    undecayed vectors), the first of its kind; else the layer's."""
    where = {id(q): (g, q) for g, group in enumerate(optimizer.param_groups) for q in group["params"]}
    same = [where[i][0] for i in layer if i in where and where[i][1].dim() == p.dim()]
    if same:
        return same[0]
    own = where[layer[0]][0] if layer and layer[0] in where else 0
    if {id(q) for q in optimizer.param_groups[own]["params"]} - new <= set(layer):
        return own
    kind = _group_of_kind(optimizer, p)
    return kind if kind is not None else own


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
    The lists are changed in place (LBFGS holds its group's), and LBFGS's one state dict, kept
    under its first parameter, moves to the new first one: inside its step(closure) it writes on
    into that dict (dropped, its history restarted at every step)."""
    flat = hasattr(optimizer, "_numel_cache") and optimizer.param_groups and optimizer.param_groups[0]["params"]
    first = optimizer.param_groups[0]["params"][0] if flat else None
    kept = optimizer.state.get(first) if first is not None else None
    dropped = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in gone:
                optimizer.state.pop(p, None)
                dropped += 1
        g["params"][:] = [p for p in g["params"] if id(p) not in gone]
    if dropped and kept is not None and optimizer.param_groups[0]["params"]:
        optimizer.state[optimizer.param_groups[0]["params"][0]] = kept
    if dropped:
        _forget_flat_history(optimizer)
    return dropped
