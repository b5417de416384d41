"""vanishing_gradient: the backward signal collapsing across depth toward the input."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.rules.decay import decayed, weight_shrink
from gradwatch.diagnose.rules.eval_mode import eval_mode_first, unnormalised_batchnorm
from gradwatch.diagnose.signals import (depth_profile, from_init, lowest_over_highest, names, persistent_start,
                                        same_role_columns, zero_initialised)
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def _ratios(run: RunSeries, quantity: str, th: Thresholds, hidden: bool, min_layers: int | None = None):
    """(rows, lowest-over-highest ratio per sampled row, values, columns), or None when the
    profile is too short to judge (fewer than `min_layers`, by default `min_profile_layers`)."""
    rows, values, cols = depth_profile(run, quantity, hidden_only=hidden)
    if len(cols) < (th.min_profile_layers if min_layers is None else min_layers) or len(rows) == 0:
        return None
    same = set(same_role_columns(run, cols))
    keep = [i for i, c in enumerate(cols) if c in same]
    values, cols = values[:, keep], [cols[i] for i in keep]
    # a row measured on under half the layers a row usually is, is no depth profile: a GAN's last
    # backward, its generator's alone in a step of its own, had 2 of 13 (its ratio 0.84 against
    # 3e-10 before; the finding's evidence all NaN, one layer named)
    counts = np.isfinite(values).sum(axis=1)
    full = counts >= 0.5 * np.median(counts)
    rows, values = rows[full], values[full]
    return rows, lowest_over_highest(values), values, cols


def find_vanishing(run: RunSeries, th: Thresholds) -> list[Finding]:
    """The backward signal is ∂L/∂s, the gradient w.r.t. each layer's output (Glorot & Bengio
    2010: it collapses toward the input while weight gradients can look level). It is a finding
    when the lowest hidden layer gets below `backward_vanishing_ratio` of the best-served hidden
    layer, or below `vanishing_ratio` while the relative weight gradient ‖∂L/∂W‖/‖W‖ (the relative
    step SGD takes) collapses as much — two views agreeing. A small relative gradient alone (inputs
    scaled down, say) is a stalled layer, not a vanishing backward signal.
    """
    backward = _ratios(run, "grad_out_rms", th, hidden=True, min_layers=2)
    if backward is None:
        return []
    rows, ratios, values, cols = backward
    short = len(cols) < th.min_profile_layers  # two hidden layers: only a drop no one layer explains
    condition = ratios < (th.short_profile_ratio if short else th.backward_vanishing_ratio)
    relative = None if short else _ratios(run, "relative_grad", th, hidden=False)
    evidence: dict = {}
    if relative is not None:
        r_rows, r_ratios, _, _ = relative
        agree = np.interp(run.steps[rows], run.steps[r_rows], np.nan_to_num(r_ratios, nan=1.0)) < th.vanishing_ratio
        condition |= (ratios < th.vanishing_ratio) & agree
    start = persistent_start(condition & np.isfinite(ratios), th.persist_samples)
    if start is None:
        return []
    first = int(run.steps[rows[start]])
    tail = ratios[start:][np.isfinite(ratios[start:])]
    # the samples that showed it: a ratio back above the bar since (a live check of a GELU MLP said
    # "4.6e-01 of the upper layers'... barely learn", the median of a tail it had recovered in)
    held = condition[start:] & np.isfinite(ratios[start:])
    ratio = float(np.median(ratios[start:][held]))
    recovered = len(tail) and not held[np.isfinite(ratios[start:])][-1]
    last = values[-1]
    finite = last[np.isfinite(last) & (last > 0)]
    top = finite.max() if len(finite) else np.nan
    low = [c for c, v in zip(cols, last) if np.isfinite(v) and v < th.vanishing_ratio * top] or cols[:1]
    layers = names(run, low)
    evidence["backward_ratio"] = ratio
    evidence["grad_out_rms_by_layer"] = {run.layers[c].name: float(v) for c, v in zip(cols, last)}
    if relative is not None:
        evidence["relative_grad_ratio"] = float(np.nanmedian(r_ratios[-len(tail):])) if len(tail) else float("nan")
    evidence["at_init"] = first == int(run.steps[0]) and from_init(run)
    if zeros := zero_initialised(run):  # all-zero weights pass no gradient down at the first step
        evidence["zero_weight_layers"] = zeros
    elif evidence["at_init"] and (frozen := unnormalised_batchnorm(run, th)):
        evidence["eval_mode_batchnorm"], evidence["act_std_after_batchnorm"] = frozen
    elif not evidence["at_init"] and (shrink := weight_shrink(run, first)) <= th.weight_shrink:
        evidence["weight_shrink"] = shrink
    severity = "error" if ratio < th.vanishing_error_ratio else "warning"
    ctx = advice.Context(run)
    causes, remedies = advice.vanishing(ctx, layers, evidence, through_time=False)
    if "weight_shrink" in evidence:  # the init was sound: the weights decayed since
        causes, remedies = decayed(evidence)
    elif "eval_mode_batchnorm" in evidence:
        causes, remedies = eval_mode_first(evidence, causes, remedies)
    now = f" ({tail[-1]:.1e} at the last sample)" if recovered else ""
    message = (f"The gradient reaching layer '{layers[0]}' is {ratio:.1e} of the upper layers' since step {first}{now}: "
               f"the layers near the input barely learn. {remedies[0].action}.")
    return [Finding("vanishing_gradient", severity, first, layers, message, evidence, tuple(causes), tuple(remedies))]

