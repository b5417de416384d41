"""Shared pieces of the remedies: argument checks, gradient lists, on-device scaling.

Kept here so each formula exists once; nothing in this file reads a tensor value on the host.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable
from typing import Any, Union

import torch

from gradwatch.errors import ConfigError
from gradwatch.remedies._sharded import is_dtensor, reduce_norm

Params = Union[torch.Tensor, Iterable[torch.Tensor]]

# torch's clip_grad_norm_ divides by (norm + 1e-6); every norm-based clipper here does the same,
# so a threshold reached by one of them means the same thing as torch's.
NORM_EPS = 1e-6


def _real(name: str, value: object, fix: str) -> float:
    """`value` as a float if it is a real number of any kind (int, float, numpy scalar), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} is not a number; {fix}")
    return float(value)


def positive_number(name: str, value: object, *, fix: str) -> float:
    """`value` as a float if finite and > 0, else ConfigError naming it and `fix` (a value fit for
    this argument: a generic 1.0 was told for ZClip's eps, whose default is 1e-6)."""
    v = _real(name, value, fix)
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name}={value!r} must be a finite number > 0; {fix}")
    return v


def whole_number(name: str, value: object, *, fix: str) -> int:
    """`value` as an int if it is an integer of any kind (int, numpy integer) >= 1, else ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a whole number >= 1; {fix}")
    return int(value)


def in_range(name: str, value: object, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    """`value` as a float if inside the interval, else ConfigError naming it and the interval."""
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    v = _real(name, value, f"pass a value in {interval}")
    if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        raise ConfigError(f"{name}={value!r} is outside {interval}; pass a value inside it")
    return v


def shown(obj: object) -> str:
    """`obj` for an error message: its repr when that is one short line, else its type (a model's repr
    is its whole module tree)."""
    text = repr(obj)
    return text if len(text) <= 60 and "\n" not in text else f"<{type(obj).__name__}>"


def as_list(params: Params) -> list[torch.Tensor]:
    """Parameters as a list (a single tensor becomes a one-item list); ConfigError for anything else
    (a model instead of its parameters, an optimizer, numbers)."""
    if isinstance(params, torch.Tensor):
        return [params]
    fix = "pass model.parameters() (or a list of tensors)"
    if isinstance(params, (torch.nn.Module, torch.optim.Optimizer)):
        what = "a model" if isinstance(params, torch.nn.Module) else "an optimizer"
        raise ConfigError(f"params={shown(params)} is {what}, not its parameters; {fix}")
    try:
        out = list(params)
    except TypeError:
        raise ConfigError(f"params={shown(params)} is not an iterable of tensors; {fix}") from None
    bad = next((p for p in out if not isinstance(p, torch.Tensor)), None)
    if bad is not None:
        raise ConfigError(f"params holds {shown(bad)}, which is not a tensor; {fix}")
    return out


def coalesced_grad(p: torch.Tensor) -> torch.Tensor | None:
    """`p.grad`; a sparse one (nn.Embedding(sparse=True)) is first coalesced in place (duplicate
    indices summed), so that its values are its entries and scaling them scales the gradient."""
    if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
        p.grad = p.grad.coalesce()
    return p.grad


def grads_of(params: Params) -> list[torch.Tensor]:
    """The existing gradients of `params` as dense tensors to norm and scale in place: a sparse
    gradient's stored values (the entries it leaves out are zeros, which change no norm).
    Parameters without a gradient are left alone."""
    grads = [coalesced_grad(p) for p in as_list(params)]
    return [g._values() if g.is_sparse else g for g in grads if g is not None]


def with_sparse_grad(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters holding a sparse gradient (torch's clip_grad_*_ cannot take those)."""
    return [p for p in params if p.grad is not None and p.grad.is_sparse]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """All parameters of all param groups; ConfigError if there are none."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer={shown(optimizer)} is not a torch.optim.Optimizer; "
                          "pass the optimizer you train with (e.g. torch.optim.SGD(model.parameters(), lr=0.1))")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:
        raise ConfigError(
            f"optimizer {type(optimizer).__name__} has no parameters; "
            "pass the optimizer you train with (e.g. torch.optim.SGD(model.parameters(), lr=0.1))"
        )
    return params


def norm_order(norm_type: Any) -> float:
    """The p of a p-norm: a number > 0, or inf (the max |g|)."""
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        p = math.nan
    if not p > 0:  # NaN, 0 and negative p are no norm of the gradient
        raise ConfigError(f"norm_type={norm_type!r} must be a number > 0 or float('inf'), e.g. 2.0")
    return p


# float16 and bfloat16 gradients are normed in float32: in float16 a finite gradient of norm above
# 65504 (entries of 1000 over 1e4 weights) has an Inf norm, and was taken for a non-finite one and
# left unclipped, the spike a clipper is for.
_NARROW = (torch.float16, torch.bfloat16)


def wide_norm(x: torch.Tensor, norm_type: float = 2.0, dim: tuple[int, ...] | None = None,
              keepdim: bool = False) -> torch.Tensor:
    """torch.linalg.vector_norm, summed in float32 for a float16/bfloat16 tensor (see _NARROW)."""
    dtype = torch.float32 if x.dtype in _NARROW else None
    return torch.linalg.vector_norm(x, norm_type, dim=dim, keepdim=keepdim, dtype=dtype)


def _wide_total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """get_total_norm's foreach pass, with float16/bfloat16 gradients normed in float32 (no copy)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = [n for (_, dtype), group in groups.items()
             for n in torch._foreach_norm(group, norm_type, dtype=torch.float32 if dtype in _NARROW else None)]
    dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms))
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device, dtype) for n in norms]), norm_type)


def total_norm(grads: list[torch.Tensor], norm_type: float = 2.0, process_group=None) -> torch.Tensor:
    """Norm of all gradients as one vector: torch's own foreach implementation, on the device
    (float16/bfloat16 gradients normed in float32, see _NARROW).

    Sharded gradients (FSDP): DTensors (FSDP2) are reduced across ranks by torch; plain local shards
    (FSDP1, use_orig_params=True) by one all-reduce over `process_group`, on every rank of it."""
    if not grads:
        norm = torch.zeros(())
    elif any(g.dtype in _NARROW for g in grads) and not any(is_dtensor(g) for g in grads):
        norm = _wide_total_norm(grads, norm_type)
    else:
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
    if is_dtensor(norm):
        norm = norm.full_tensor()  # already reduced by torch: replicated on every rank
    if process_group is not None:
        norm = reduce_norm(norm, norm_type, process_group)
    return norm


def scale_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient in place by the on-device scalar `coef` (no host sync)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), group in groups.items():
        torch._foreach_mul_(group, coef.to(device=device, dtype=coef_dtype(dtype)))


def coef_dtype(dtype: torch.dtype) -> torch.dtype:
    """A clipping factor's dtype for gradients of `dtype`: at least float32. A factor of 3e-6 or
    1e-7 (a spike clipped to norm 1) is subnormal in float16, 2-20% off once rounded to it."""
    return torch.promote_types(dtype, torch.float32)


def clip_coef(norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """min(threshold / (norm + eps), 1), and exactly 1 where norm or threshold is not finite.

    Non-finite gradients are left as they are (scaling an Inf by 0 would only make a NaN); catching
    them is `gw.guard`'s job. A missing threshold (NaN or +Inf) means "do not clip".
    """
    coef = threshold / (norm + NORM_EPS)
    ok = torch.isfinite(coef) & torch.isfinite(norm)
    return torch.where(ok, coef.clamp(max=1.0), torch.ones_like(coef))


def forward_once(model: torch.nn.Module, example_input: object) -> None:
    """One forward pass to look at the model (hooks do the looking): eval mode, no grad, and every
    module's training flag put back afterwards, so BatchNorm statistics and dropout are untouched."""
    modes = {m: m.training for m in model.modules()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as exc:  # the user's model and input: say which argument to fix
        raise ConfigError(f"example_input could not run through the model ({type(exc).__name__}: {exc}); "
                          "pass a batch the model accepts") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
