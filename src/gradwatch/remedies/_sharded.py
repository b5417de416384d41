"""Gradients sharded across ranks (FSDP): their norms, for the clippers (each exact, one all-reduce a
call), and the guard's agreement on a skip (one one-element all-reduce a step).

- FSDP2 (`fully_shard`): parameters and gradients are DTensors; torch's own norm functions reduce
  them across ranks. Dim-0 sharding splits a weight's rows (AGC's units) between ranks but never
  one row, while a 1-d parameter (a bias, one unit for AGC) is split.
- FSDP1 with use_orig_params=True: each rank holds a flat slice of every parameter as a plain
  tensor, which can cut a unit anywhere; the slice's place in the full parameter comes from FSDP's
  flat-parameter metadata (`fsdp=` the wrapped model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradwatch.errors import ConfigError


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "placements") and hasattr(t, "to_local")


def reduce_norm(norm: torch.Tensor, norm_type: float, group) -> torch.Tensor:
    """The norm over all ranks from each rank's norm of its own shards (one all-reduce)."""
    import torch.distributed as dist

    if math.isinf(norm_type):
        out = norm.float().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out
    out = norm.double() ** norm_type
    dist.all_reduce(out, group=group)
    return (out ** (1.0 / norm_type)).to(norm.dtype)


@dataclass
class _Piece:
    param: torch.Tensor
    start: int  # index of this rank's first element in the full parameter, flattened
    row: int  # elements per unit in the full parameter
    units: int
    replicated: bool = False  # every rank holds all of it


def _units(shape: torch.Size) -> tuple[int, int]:
    """(elements per unit, units): the rows of a >= 2-d parameter; a 0-/1-d one is one unit."""
    if len(shape) > 1:
        return math.prod(shape[1:]), shape[0]
    return max(math.prod(shape), 1), 1


def _dtensor_piece(p: torch.Tensor) -> tuple[_Piece, object]:
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(shard_dims) > 1 or any(not isinstance(pl, (Shard, Replicate)) or (isinstance(pl, Shard) and pl.dim != 0)
                                  for pl in p.placements):
        raise ConfigError(f"AGC handles parameters sharded on dim 0 over one mesh dimension, got {p.placements}; "
                          "use fully_shard's default placement")
    if not shard_dims:
        return _Piece(p, 0, *_units(p.shape), replicated=True), None
    dim = shard_dims[0]
    chunk = -(-p.shape[0] // p.device_mesh.size(dim))  # rows per rank: torch.chunk, as FSDP2 shards
    first_row = min(p.device_mesh.get_local_rank(dim) * chunk, p.shape[0])
    return _Piece(p, first_row * math.prod(p.shape[1:]), *_units(p.shape)), p.device_mesh.get_group(dim)


def fsdp1_layout(model: torch.nn.Module) -> tuple[dict[int, tuple[torch.Size, int | None]], object]:
    """{id(param): (full shape, first local element or None)} of an FSDP1 model, and its group."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(model, FullyShardedDataParallel) or not model._use_orig_params:
        raise ConfigError("fsdp= must be the FullyShardedDataParallel(..., use_orig_params=True) model whose "
                          f"gradients are clipped, got {type(model).__name__}")
    layout = {}
    for module in FullyShardedDataParallel.fsdp_modules(model):
        handle = module._handle
        if handle is None:
            continue
        flat = handle.flat_param
        for p, info, shape in zip(flat._params, flat._shard_param_infos, flat._shapes):
            layout[id(p)] = (shape, info.intra_param_start_idx if info.in_shard else None)
    return layout, model.process_group


def _pieces(params: list[torch.Tensor], layout: dict | None) -> tuple[list[_Piece], object]:
    pieces, group = [], None
    for p in params:
        if is_dtensor(p):
            piece, g = _dtensor_piece(p)
            group = group or g
        elif layout is not None and id(p) in layout:
            shape, start = layout[id(p)]
            piece = _Piece(p, start or 0, *_units(shape))
        else:
            piece = _Piece(p, 0, *_units(p.shape), replicated=True)
        pieces.append(piece)
    return pieces, group


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds (a DTensor's local shard; any other tensor as is)."""
    return t.to_local() if is_dtensor(t) else t


def shard_group(params: list[torch.Tensor]):
    """The process group whose ranks each hold a shard of these parameters, or None if none is
    sharded: a DTensor's (FSDP2) over its sharded mesh dim; for FSDP1 (use_orig_params=True, whose
    parameters carry FSDP's `_fsdp_flattened` mark and no group) the default group, whose ranks
    all step together under FSDP."""
    for p in params:
        if is_dtensor(p):
            from torch.distributed.tensor import Shard

            dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
            if dims:
                return p.device_mesh.get_group(dims[0])
        elif getattr(p, "_fsdp_flattened", False):
            import torch.distributed as dist

            return dist.group.WORLD
    return None


@torch.no_grad()
def sharded_agc(params: list[torch.Tensor], clipping: float, eps: float, layout: dict | None, group) -> torch.Tensor:
    """AGC (agc.py) when units may be split across ranks: per-unit squared sums of gradients and
    weights from every rank's slices, summed by one all-reduce; returns the total norm before clipping."""
    import torch.distributed as dist

    pieces, dtensor_group = _pieces(params, layout)
    group = group if group is not None else dtensor_group
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + piece.units)
    device = next((local(p).device for p in params), torch.device("cpu"))
    sums = torch.zeros(2, offsets[-1], dtype=torch.float32, device=device)  # [grad², weight²] per unit
    owner = dist.get_rank(group) == 0  # replicated parameters are counted once, by group rank 0
    index = []
    for piece, offset in zip(pieces, offsets):
        g = None if piece.param.grad is None else local(piece.param.grad)
        if g is None or g.numel() == 0:
            index.append(None)
            continue
        unit = offset + torch.div(piece.start + torch.arange(g.numel(), device=device), piece.row,
                                  rounding_mode="floor")
        index.append(unit)
        if owner or not piece.replicated:
            w = local(piece.param.detach())
            sums[0].index_add_(0, unit, g.reshape(-1).float().square())
            sums[1].index_add_(0, unit, w.reshape(-1).float().square())
    dist.all_reduce(sums, group=group)
    grad_norm, weight_norm = sums.sqrt()
    max_norm = weight_norm.clamp(min=eps).mul_(clipping)
    from gradwatch.remedies.agc import unit_coef  # here, not above: agc.py imports this module

    coef = unit_coef(grad_norm, max_norm)
    for piece, unit in zip(pieces, index):
        if unit is not None:
            g = local(piece.param.grad)
            g.mul_(coef[unit].reshape(g.shape).to(torch.promote_types(g.dtype, torch.float32)))
    return sums[0].sum().sqrt()


def flag_device(group, device: torch.device) -> torch.device:
    """Where the agreement's flag can travel: `device` (the parameters'), but a CUDA device when they
    are on the CPU (FSDP's CPU offload) and the group's only backend is NCCL, which takes no CPU tensor."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if device.type == "cpu" and "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def agreed(finite: bool, group, device: torch.device) -> bool:
    """Every rank of `group` found its shards finite (one one-element all-reduce). Under FSDP each rank
    checks only its shard of the gradients: deciding alone, the rank holding an Inf row would skip
    while the others stepped their shards, and the model would be half updated, Adam's step counts
    and (after `patience` skips) the lrs different across ranks."""
    import torch.distributed as dist

    bad = torch.tensor([0 if finite else 1], dtype=torch.int32, device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return not bool(bad)
