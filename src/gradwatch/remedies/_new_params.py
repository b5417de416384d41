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


class Added(NamedTuple):
    """A parameter a change added: the ids of the layer it goes with (the weight first), and of the
    modules around it, nearest first (a block, a stage, the model): where a group is looked for."""

    param: torch.Tensor
    layer: list[int]
    scopes: list[set[int]]


def added_parameters(model: nn.Module, before: Before) -> list[Added]:
    """Each trainable parameter a change added to `model`, with the layer it goes with: an
    optimizer that trains that layer trains it too, as one built after the change would."""
    out, seen = [], set(before.kept)
    for name, module in model.named_modules(remove_duplicate=False):
        new = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in new)
        if new:
            layer, scopes, around = _layer_of(model, name, before), [], name
            while around:
                around = around.rpartition(".")[0]
                scopes.append({id(p) for p in model.get_submodule(around).parameters()} & before.kept)
            out += [Added(p, layer, scopes) for p in new]
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


def give_added(optimizers: list[torch.optim.Optimizer], added: list[Added],
               model: set[int] = frozenset()) -> list[tuple[int, int, torch.Tensor]]:
    """Each added parameter where an optimizer built after the change would have it: in every
    optimizer that holds its whole layer (a fine-tuning's optimizer of the whole model beside a
    head's), or, the layer split over several (matrices in Muon or SGD, vectors in AdamW), in the one
    holding a layer parameter of its kind (as many dimensions: a norm's vectors, a GRU's
    matrices), else any parameter of its kind; in the group `_group` picks. Where a Muon holds the
    whole layer (it steps matrices only) and the parameter is no matrix, in the optimizer of
    `model`'s (its parameter ids) holding vectors nearest to it, else in none (Muon raised on a
    vector). Not to an optimizer that holds none of the layer (a head-only optimizer would train
    a frozen body's norms, at the head's lr); not as a group of its own (it would lack the lr and
    the keys a scheduler keeps per group); not one any of them holds already. Returns (optimizer
    index, group index, parameter) for each one given."""
    held: dict[int, list[tuple[int, int]]] = {}  # parameter id -> (optimizer, group) holding it
    for o, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):
            for q in group["params"]:
                held.setdefault(id(q), []).append((o, g))
    given, new = [], {id(a.param) for a in added}
    for p, layer, scopes in added:
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
            targets = sorted(layer_in, key=lambda o: (not same(o), not _kinds(optimizers[o], p, new), o))[:1]
        if p.dim() < 2 and all(_steps_matrices_only(optimizers[o]) for o in targets):
            def nearest(o: int) -> int:  # the first scope (nearest module) whose vectors it holds
                ids = {id(q) for group in optimizers[o].param_groups for q in group["params"] if q.dim() < 2}
                return next((k for k, scope in enumerate(scopes) if ids & scope), len(scopes))
            others = [o for o, opt in enumerate(optimizers) if o not in layer_in and not _steps_matrices_only(opt)
                      and _kinds(opt, p, new) and any(id(q) in model for group in opt.param_groups
                                                      for q in group["params"])]
            targets = sorted(others, key=lambda o: (nearest(o), o))[:1]
        for o in sorted(set(targets)):
            g = _group(optimizers[o], p, layer_in.get(o, []), new, scopes)
            optimizers[o].param_groups[g]["params"].append(p)
            held.setdefault(id(p), []).append((o, g))
            given.append((o, g, p))
    for o in {o for o, _, _ in given}:
        _forget_flat_history(optimizers[o])
    return given


def _param(optimizer: torch.optim.Optimizer, i: int) -> torch.Tensor:
    return next(q for group in optimizer.param_groups for q in group["params"] if id(q) == i)


def _steps_matrices_only(optimizer: torch.optim.Optimizer) -> bool:
    """A Muon (torch's, or any of that name: SingleDeviceMuon): it orthogonalises 2-D updates,
    and raised on a vector."""
    return any("muon" in cls.__name__.lower() for cls in type(optimizer).__mro__)


def _kinds(optimizer: torch.optim.Optimizer, p: torch.Tensor, new: set[int]) -> bool:
    """`optimizer` held a parameter of `p`'s kind before the change (`new`: the ones it adds)."""
    return any(q.dim() == p.dim() and id(q) not in new for group in optimizer.param_groups for q in group["params"])


def _group(optimizer: torch.optim.Optimizer, p: torch.Tensor, layer: list[int], new: set[int],
           scopes: list[set[int]]) -> int:
    """The group of `optimizer` (its index) for `p`: that of a `layer` parameter of its kind; else
    the layer's own where it holds nothing else (per-layer lrs); else, from the nearest module
    around it out (a block, a stage, the model): where the groups split the kinds (vectors alone
    in some, matrices alone in others: weight decay), a group holding that module's parameters of
    its kind (a block's no-decay group, in layer-wise lr decay); where they do not, the one group
    holding all that module's parameters (a stage's); else the layer's. (`new`: the parameters
    being added, not counted.)"""
    where = {id(q): (g, q) for g, group in enumerate(optimizer.param_groups) for q in group["params"] if id(q) not in new}
    same = [where[i][0] for i in layer if i in where and where[i][1].dim() == p.dim()]
    if same:
        return same[0]
    own = where[layer[0]][0] if layer and layer[0] in where else 0
    if {i for i, (g, _) in where.items() if g == own} <= set(layer):
        return own
    kinds = [{q.dim() < 2 for q in group["params"] if id(q) not in new} for group in optimizer.param_groups]
    split = {True} in kinds and {False} in kinds
    for scope in scopes:
        if split:
            kind = [g for i, (g, q) in where.items() if i in scope and q.dim() == p.dim()]
            if kind:
                return min(kind)
        elif len(groups := {g for i, (g, _) in where.items() if i in scope}) == 1:
            return groups.pop()
    return own


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
