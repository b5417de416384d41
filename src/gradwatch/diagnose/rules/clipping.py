"""Gradient clipping as the run shows it: where a trainer said it clips (run meta `grad_clip`, from
the Lightning / HF callbacks), or where plain SGD's sampled updates are shorter than lr·g by a
fixed length (`clip_grad_norm_` in the loop). The recorded norms are taken before any clipping.

Clipping by norm rescales the step to lr·c·g/‖g‖ whenever ‖g‖ > c. Triggered on the rare spike it
is a safety net; triggered on nearly every step it is the update rule itself, normalised gradient
descent with a fixed step length lr·c, and the learning rate the script sets no longer sets the
step: a gradient far above c (a loss on the wrong scale, a gradient growing under too long steps)
goes unseen, since nothing diverges."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.diagnose.advice import Context, told_norm_limit, two_digits
from gradwatch.diagnose.finding import Remedy
from gradwatch.diagnose.signals import plain_sgd, total_grad_norm
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries

@dataclass(frozen=True)
class Clipping:
    limit: float  # the max norm c
    said: str  # where the clipping is known from, for the message
    kept: np.ndarray  # per recorded step, the share of lr·g the step kept: min(1, c/‖g‖); NaN unrecorded


def clipping(run: RunSeries, th: Thresholds) -> Clipping | None:
    """The run's clipping by norm, told by the trainer or measured; None when neither shows one."""
    limit, said = _told(run)
    if limit is None:
        limit, said = _measured(run, th)
    if limit is None:
        return None
    total = total_grad_norm(run, stepped_only=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kept = np.where(np.isfinite(total) & (total > 0), np.minimum(1.0, limit / total), np.nan)
    return Clipping(limit, said, kept)


def _told(run: RunSeries) -> tuple[float | None, str]:
    """A trainer's clipping, as the callbacks keep it. Not the script's own `clip_grad_norm_` the
    watch noted (its function named in the meta): under SGD with momentum a clip at 0.01, active on
    every step, was called an exploding gradient whose advice (the lr the clipping takes) kept the
    step as short (70% accuracy; the limit at 1.0, same lr: 99.6%). Plain SGD measures it."""
    told = run.meta.get("grad_clip")
    if isinstance(told, str) and "clip_grad" in told:
        return None, ""
    limit = told_norm_limit(told)
    return (limit, f"the run clips {told}") if limit is not None and limit > 0 else (None, "")


def _measured(run: RunSeries, th: Thresholds) -> tuple[float | None, str]:
    """Under plain SGD the step is lr·g, so ‖Δw‖ / lr is the gradient norm the step used. Where it
    is at most half the recorded (pre-clip) norm on nearly every sample and one fixed length on
    all of them while the recorded norm varies, the script clips at that length: clipping sets
    ‖Δw‖ = lr·c exactly (clip_grad_norm_ at 1: 1.0000016 max/min over 30 samples while the norm
    went 834 -> 6e4; weight decay's λw adds a little), where a step that is some share of lr·g
    (layers the optimizer does not step) varies as the gradient does, by 10% or more across
    minibatches. With momentum the step sums past gradients and its length says no limit."""
    if not plain_sgd(run):
        return None, ""
    u, w, g = (run.metrics.get(m) for m in ("update_ratio", "weight_norm", "grad_norm"))
    if u is None or w is None or g is None:
        return None, ""
    cols = [c for c, layer in enumerate(run.layers) if layer.role != "activation"]
    with np.errstate(invalid="ignore"):  # an infinite ratio against a zero-initialised layer's norm 0: NaN, left out
        step = u[:, cols] * w[:, cols]
    rows = np.flatnonzero(np.isfinite(step).all(axis=1) & np.isfinite(g[:, cols]).all(axis=1) & (run.lr > 0))
    if len(rows) < th.persist_samples:
        return None, ""
    used = np.sqrt(np.square(step[rows]).sum(axis=1)) / run.lr[rows]  # ‖Δw‖ / lr
    given = np.sqrt(np.square(g[rows][:, cols]).sum(axis=1))
    short = used <= 0.5 * given
    if short.mean() < th.clip_active_share or not (used[short] > 0).all():
        return None, ""
    spread_used = used[short].max() / used[short].min() - 1
    spread_given = given[short].max() / given[short].min() - 1
    if not (spread_given >= 0.1 and spread_used <= min(0.05, 0.25 * spread_given)):
        return None, ""
    limit = float(np.median(used[short]))
    return limit, (f"the script clips the total norm to {limit:.3g} (measured: every sampled update under SGD is "
                   f"lr x {limit:.3g} long)")


def clipped_advice(ctx: Context, evidence: dict, causes: list[str], remedies: list[Remedy]) -> tuple[list[str], list[Remedy]]:
    """An exploding finding's advice when clipping is active on nearly every step: the clipping is
    a cause (after the loss's scale, when that is first), and clipping again is no remedy: the
    clip remedies give way to giving the learning rate the step clipping takes."""
    at = 1 if causes and causes[0].startswith("loss scale:") else 0
    causes = [*causes[:at], _cause(ctx, evidence), *causes[at:]]
    clips = [i for i, r in enumerate(remedies) if r.code.startswith(("torch.nn.utils.clip_grad_norm_", "gw.clip.attach"))]
    kept = [r for i, r in enumerate(remedies) if i not in clips]
    at = clips[0] if clips else len(kept)
    return causes, [*kept[:at], _remedy(ctx, evidence), *kept[at:]]


def _cause(ctx: Context, evidence: dict) -> str:
    """Clipping on every step: the learning rate no longer sets the step, the limit does; a norm
    that grew under it is the step too long for the curvature (normalised steps of fixed length
    bounce around a minimum, their gradient never falling), one that did not is the gradient's
    scale."""
    grew = evidence["clip_norm_growth"] >= 10
    why = (f"the norm grew {evidence['clip_norm_growth']:.3g}x under it: steps of lr x the limit ({ctx.lr_said} with "
           f"{ctx.optimizer}) are too long for the loss's curvature" if grew else
           "the gradient is on a scale far above the limit from the start")
    return (f"gradient clipping: active on {evidence['clip_active_share']:.0%} of the steps at "
            f"{1 / evidence['clip_kept']:.3g}x the limit {evidence['clip_limit']:.3g}; {why}")


def safety_limit(evidence: dict) -> str:
    """A clipping limit that catches spikes only: twice the typical (median) norm."""
    return two_digits(2 * evidence["clip_median_norm"])


def _remedy(ctx: Context, evidence: dict) -> Remedy:
    """The step clipping now takes, given back to the learning rate, and the limit set back to a
    safety net at twice the typical norm (the level the exploding advice clips at)."""
    lr = ctx.lr * evidence["clip_kept"]
    limit = safety_limit(evidence)
    lr_said = f"{lr:.3g}" if math.isfinite(lr) and lr > 0 else f"{evidence['clip_kept']:.3g} * your current lr"
    return Remedy(f"Give the learning rate the step clipping takes now (lr x {evidence['clip_kept']:.3g} = {lr_said}) "
                  f"and clip at twice the typical norm ({limit}), so clipping catches spikes only",
                  f"for group in optimizer.param_groups: group['lr'] = {lr_said}\n"
                  f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={limit})  # before optimizer.step()")
