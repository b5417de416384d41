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


def give_added(optimizers: list[torch.optim.Optimizer],
               added: list[tuple[torch.Tensor, list[int]]]) -> list[tuple[int, int, torch.Tensor]]:
    """Each added parameter into one group that holds its layer, where an optimizer built after the
    change would have it: of a layer parameter with as many dimensions (a norm's weight and bias
    with its layer's bias, where the usual split gives vectors no weight decay; a GRU's matrices with
    the RNN's), else of the layer's first (the weight). One group of all `optimizers`: where the
    layer's weights and biases are in two (Muon and AdamW), a norm stepped by both moved twice a
    step, or crashed one. Not to an optimizer that holds none of its layer (a head-only optimizer
    would train a frozen body's norms); not as a group of its own (it would lack the lr and the keys
    a scheduler keeps per group); not one any of them holds already. Returns (optimizer index, group
    index, parameter) for each one given."""
    where = {id(q): (o, g, q) for o, opt in enumerate(optimizers)
             for g, group in enumerate(opt.param_groups) for q in group["params"]}
    given = []
    for p, layer in added:
        held = [(where[i][2].dim() != p.dim(), rank, *where[i][:2]) for rank, i in enumerate(layer) if i in where]
        if held and id(p) not in where:
            _, _, o, g = min(held)
            optimizers[o].param_groups[g]["params"].append(p)
            where[id(p)] = (o, g, p)
            given.append((o, g, p))
    for o in {o for o, _, _ in given}:
        _forget_flat_history(optimizers[o])
    return given


def _forget_flat_history(optimizer: torch.optim.Optimizer) -> None:
    """An optimizer that keeps its parameters as one flat vector (LBFGS: `_numel_cache`, and a
    history of directions that long) starts its history anew once they change: sized to the old
    vector, it crashed at the next step."""
    if hasattr(optimizer, "_numel_cache"):
        optimizer._numel_cache = None
        optimizer.state.clear()


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
