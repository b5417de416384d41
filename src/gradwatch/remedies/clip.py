"""Gradient clipping: torch's own by-norm and by-value clipping, plus the adaptive clippers torch lacks.

Every clipper is a callable ``clipper(params) -> total norm before clipping`` that runs on the
device without reading a value on the host, so it can be attached to any optimizer as a step
pre-hook: ``gw.clip.attach(optimizer, gw.clip.ZClip())``.

Worked example, by norm: a gradient of norm 27 with threshold 5 is scaled by 5/27 ≈ 0.185, to norm 5.

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([2.0, 10.0, 25.0])
>>> clip_norm([p], max_norm=5.0)           # returns the norm before clipping
tensor(27.)
>>> p.grad                                  # each entry times 5/27
tensor([0.3704, 1.8519, 4.6296])
>>> round(p.grad.norm().item(), 5)
5.0

By value: every entry is clamped to [-5, 5] on its own, so the direction changes.

>>> p.grad = torch.tensor([7.0, -6.0, 3.0])
>>> clip_value([p], 5.0)
>>> p.grad
tensor([ 5., -5.,  3.])
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from torch.utils.hooks import RemovableHandle

from gradwatch.errors import ConfigError
from gradwatch.remedies._common import (
    Params,
    as_list,
    clip_coef,
    grads_of,
    norm_order,
    optimizer_params,
    positive_number,
    scale_,
    shown,
    total_norm,
    with_sparse_grad,
)
from gradwatch.remedies.agc import AGC
from gradwatch.remedies.percentile_clip import AutoClip
from gradwatch.remedies.zscore_clip import ZClip

Clipper = Callable[[Params], "torch.Tensor | None"]

__all__ = ["clip_norm", "clip_value", "ClipNorm", "ClipValue", "AGC", "AutoClip", "ZClip", "attach"]


def clip_norm(params: Params, max_norm: float, norm_type: float = 2.0, process_group=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with gradwatch's argument checks; returns the pre-clip norm.

    FSDP1 (use_orig_params=True) shards are plain tensors: pass `process_group` (the model's) for
    the norm over all ranks. FSDP2's DTensor gradients need nothing (torch reduces them). Sparse
    gradients, which torch's function rejects, are clipped by the same formula on their values, and
    so are float16 ones, whose norm torch's function takes in float16: above 65504 it is Inf, and a
    finite gradient was scaled to 0."""
    max_norm = positive_number("max_norm", max_norm, fix="pass the largest total gradient norm to allow, e.g. 1.0")
    norm_type = norm_order(norm_type)  # as ClipNorm checks it: 0 and negative p are no norm
    params = as_list(params)
    if process_group is None and not with_sparse_grad(params) and \
            not any(p.grad is not None and p.grad.dtype == torch.float16 for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    grads = grads_of(params)
    norm = total_norm(grads, norm_type, process_group)
    scale_(grads, clip_coef(norm, torch.tensor(max_norm, device=norm.device)))
    return norm


def clip_value(params: Params, clip_value: float) -> None:
    """torch.nn.utils.clip_grad_value_ with gradwatch's argument checks (clamps each entry to ±clip_value).

    A sparse gradient, which torch's function rejects, has its values clamped (after coalescing:
    clamping entries, not the duplicates that sum to one). A complex gradient, which torch's clamp
    rejects, has its real and imaginary parts clamped each, as torch's optimizers step a complex
    parameter as its real view."""
    clip_value = positive_number("clip_value", clip_value, fix="pass the largest |gradient entry| to allow, e.g. 1.0")
    params = as_list(params)
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse and not p.grad.is_complex()]
    if dense:  # torch's function fails on an empty list
        torch.nn.utils.clip_grad_value_(dense, clip_value)
    others = [p for p in params if p.grad is not None and (p.grad.is_sparse or p.grad.is_complex())]
    for values in grads_of(others):
        (torch.view_as_real(values) if values.is_complex() else values).clamp_(-clip_value, clip_value)


class ClipNorm:
    """Clip the total gradient norm to `max_norm` (torch's clip_grad_norm_), as an attachable clipper."""

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0, process_group=None) -> None:
        self.max_norm = positive_number("max_norm", max_norm, fix="pass e.g. ClipNorm(1.0)")
        self.norm_type = norm_order(norm_type)
        self.process_group = process_group  # FSDP1: the model's, for the norm over all shards
        self.last_norm: torch.Tensor | None = None

    def __call__(self, params: Params) -> torch.Tensor:
        self.last_norm = clip_norm(params, self.max_norm, self.norm_type, self.process_group)
        return self.last_norm

    def __repr__(self) -> str:
        return f"ClipNorm(max_norm={self.max_norm:g})"


class ClipValue:
    """Clamp every gradient entry to ±`clip_value` (torch's clip_grad_value_), as an attachable clipper."""

    def __init__(self, clip_value: float = 1.0, process_group=None) -> None:
        self.clip_value = positive_number("clip_value", clip_value, fix="pass e.g. ClipValue(1.0)")
        self.process_group = process_group  # FSDP1: the model's, for the norm it returns over all shards
        self.last_norm: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, params: Params) -> torch.Tensor:
        """Returns the total norm before clamping, as every clipper does (one reduction, on the device)."""
        params = as_list(params)
        self.last_norm = total_norm(grads_of(params), 2.0, self.process_group)
        clip_value(params, self.clip_value)
        return self.last_norm

    def __repr__(self) -> str:
        return f"ClipValue(clip_value={self.clip_value:g})"


def unscale_fused(optimizer: torch.optim.Optimizer) -> None:
    """GradScaler hands an optimizer that unscales inside its own step (fused Adam, AdamW, SGD) the
    still-scaled gradients and `optimizer.grad_scale`: clipped as they are, the threshold would bound
    the gradient times the scale. Unscale them here, as ``scaler.unscale_`` does, and tell the step."""
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:
        scale_(grads_of(optimizer_params(optimizer)), scale.double().reciprocal().float())
        optimizer.grad_scale = None


def _unreduced_fsdp1(params: list[torch.Tensor], clipper: Clipper) -> bool:
    """FSDP1 (use_orig_params=True) leaves each rank a slice of every parameter as a plain tensor, with
    FSDP's `_fsdp_flattened` mark and no group: a norm-based clipper not given the group takes the
    norm of that slice only."""
    if not any(getattr(p, "_fsdp_flattened", False) for p in params):
        return False
    if isinstance(clipper, AGC):
        return clipper._layout is None
    return isinstance(clipper, (ClipNorm, AutoClip, ZClip)) and clipper.process_group is None


def attach(optimizer: torch.optim.Optimizer, clipper: Clipper) -> RemovableHandle:
    """Run `clipper` on all of `optimizer`'s parameters right before every optimizer.step().

    Uses ``optimizer.register_step_pre_hook``, so the training loop does not change. A step given a
    closure (LBFGS) computes its gradients inside the step: there the clipper runs after every call
    of the closure, on the gradients the step then uses (LBFGS calls it up to `max_iter` times a
    step, and AutoClip and ZClip count each call). The returned
    handle removes the hook (``handle.remove()``, or use it as a context manager). The clipper's
    last pre-clip norm stays on the device in ``clipper.last_norm`` (a clipper of your own: where it
    returns one).
    """
    if isinstance(clipper, type):  # the class itself would be called with the parameters as its first argument
        raise ConfigError(f"clipper={clipper.__name__} is a class, not a clipper; pass an instance, "
                          f"e.g. gw.clip.{clipper.__name__}()")
    if not callable(clipper):
        raise ConfigError(f"clipper={shown(clipper)} is not callable; pass e.g. gw.clip.ZClip() or gw.clip.ClipNorm(1.0)")
    try:  # a function needing more than the parameters (gw.clip.clip_norm needs max_norm) fails now, not at the first step
        inspect.signature(clipper).bind([])
    except TypeError as exc:
        name = getattr(clipper, "__name__", None) or shown(clipper)
        raise ConfigError(f"clipper={name} cannot be called with the parameters alone ({exc}); attach calls "
                          "clipper(params) before each step: pass a clipper such as gw.clip.ClipNorm(1.0), or "
                          "lambda params: gw.clip.clip_norm(params, 1.0)") from None
    except ValueError:  # no signature to read (a builtin): find out at the first step
        pass
    optimizer_params(optimizer)  # fail now, not at the first step, if there is nothing to clip
    if any(getattr(hook, "clipper", None) is clipper for hook in optimizer._optimizer_step_pre_hooks.values()):
        raise ConfigError(f"{clipper!r} is already attached to this optimizer; attached twice it would clip twice "
                          "per step (AutoClip's history and ZClip's mean counting every step twice): keep one "
                          "handle, or remove() it before attaching again")

    def _clip(opt: torch.optim.Optimizer) -> None:
        unscale_fused(opt)
        norm = clipper(optimizer_params(opt))
        if norm is not None:
            try:
                clipper.last_norm = norm  # type: ignore[attr-defined]
            except AttributeError:
                pass

    def _pre_step(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # step(closure) (LBFGS, or SGD/Adam given one) computes its gradients inside the step, by
        # calling the closure: clipping before the step would clip last step's stale gradients and
        # leave the ones the step uses unclipped. Clip right after each closure call instead.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            _clip(opt)
            return None

        def clipped_closure() -> object:
            loss = closure()
            _clip(opt)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": clipped_closure}
        return (args[0], clipped_closure, *args[2:]), kwargs

    if _unreduced_fsdp1(optimizer_params(optimizer), clipper):
        warnings.warn(f"gw.clip.attach: the optimizer's parameters are FSDP1 shards (FullyShardedDataParallel with "
                      f"use_orig_params=True) and {clipper!r} has no process group: each rank would clip by the norm of "
                      "its own shard, by a different factor on each rank; pass process_group=model.process_group "
                      "(AGC: fsdp=model). Under ShardingStrategy.NO_SHARD the gradients are whole on every rank and "
                      "nothing is needed", stacklevel=2)
    if isinstance(optimizer, torch.optim.LBFGS):
        # LBFGS's curvature pairs are differences of successive gradients, y = g' - g: scaled each by
        # its own clip factor, y is no difference of one function's gradients, and the quasi-Newton
        # step it builds can point anywhere (docs/remedies.md: 5 of 8 short digits runs diverged).
        warnings.warn(f"gw.clip.attach: clipping LBFGS's gradients ({clipper!r}) breaks its curvature estimate, built "
                      "from differences of successive gradients that clipping scales each by its own factor: it can "
                      "diverge where unclipped LBFGS converges; bound its steps with "
                      "torch.optim.LBFGS(..., line_search_fn='strong_wolfe') instead of clipping", stacklevel=2)
    _pre_step.clipper = clipper  # type: ignore[attr-defined]  # how a second attach finds it
    return optimizer.register_step_pre_hook(_pre_step)

