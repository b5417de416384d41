"""vanishing_gradient: the backward signal collapsing across depth toward the input."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.signals import depth_profile, lowest_over_highest, names, persistent_start
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def find_vanishing(run: RunSeries, th: Thresholds) -> list[Finding]:
    """Two views of the same collapse, either one is enough:

    - the relative gradient ‖∂L/∂W‖/‖W‖ (the relative step SGD takes) of the lowest layer against
      the layers above it: the lower layers cannot learn at the upper layers' pace;
    - the RMS of ∂L/∂s (Glorot & Bengio's back-propagated gradient) of the lowest hidden layer
      against the hidden layers above it, which collapses even where weight gradients look level.
    """
    evidence: dict = {}
    first_steps = []
    layers: tuple[str, ...] = ()
    for quantity, limit, hidden in (("relative_grad", th.vanishing_ratio, False),
                                    ("grad_out_rms", th.backward_vanishing_ratio, True)):
        rows, values, cols = depth_profile(run, quantity, hidden_only=hidden)
        if len(cols) < th.min_profile_layers or len(rows) == 0:
            continue
        ratios = np.array([lowest_over_highest(v) for v in values])
        start = persistent_start(ratios < limit, th.persist_samples)
        if start is None:
            continue
        tail = ratios[start:][np.isfinite(ratios[start:])]
        evidence[f"{quantity}_ratio"] = float(np.median(tail))
        evidence[f"{quantity}_limit"] = limit
        first_steps.append(int(run.steps[rows[start]]))
        # the layers that get less than `limit` of the best-served layer, from the input up
        last = values[-1]
        top = np.nanmax(np.where(last > 0, last, np.nan)) if np.isfinite(last).any() else np.nan
        low = [c for c, v in zip(cols, last) if np.isfinite(v) and v < limit * top] or cols[:1]
        layers = layers or names(run, low)
        evidence[f"{quantity}_by_layer"] = {run.layers[c].name: float(v) for c, v in zip(cols, last)}
    if not first_steps:
        return []
    first = min(first_steps)
    evidence["at_init"] = first == int(run.steps[0])
    ratio = min(v for k, v in evidence.items() if k.endswith("_ratio"))
    severity = "error" if ratio < 1e-4 else "warning"
    ctx = advice.Context(run)
    causes, remedies = advice.vanishing(ctx, layers, evidence, through_time=False)
    message = (f"The gradient reaching layer '{layers[0]}' is {ratio:.1e} of the upper layers' since step {first}: "
               f"the layers near the input barely learn. {remedies[0].action}.")
    return [Finding("vanishing_gradient", severity, first, layers, message, evidence, tuple(causes), tuple(remedies))]
