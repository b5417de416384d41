"""Weights shrunk toward 0 since the start: weight decay (or an L2 term) outweighing the gradient.
Under SGD the step is lr·(g + λw), so the weights settle where λ‖w‖ ≈ ‖g‖; from a sound
initialisation, training grows its weights or keeps their scale (`Thresholds.weight_shrink`)."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.diagnose.advice import INSERT_NORM_CODE
from gradwatch.diagnose.finding import Remedy
from gradwatch.diagnose.signals import profile_columns
from gradwatch.store.series import RunSeries


def weight_shrink(run: RunSeries, step: float = np.inf) -> float:
    """The weight layers' total norm at `step` (the last sample by then; by default the run's last)
    over their first: each layer's backward gain falls with its weights, so weights decayed toward
    0 starve the layers below (NaN when not sampled)."""
    w, cols = run.metrics.get("weight_norm"), profile_columns(run)
    if w is None or not cols:
        return float("nan")
    rows = np.flatnonzero(np.isfinite(w[:, cols]).all(axis=1))
    rows_by_then = rows[run.steps[rows] <= step]
    if len(rows_by_then) == 0:
        return float("nan")
    total = np.sqrt(np.square(w[rows_by_then[[0, -1]]][:, cols]).sum(axis=1))
    return float(total[1] / total[0]) if total[0] > 0 else float("nan")


def decayed(evidence: dict) -> tuple[list[str], list[Remedy]]:
    """Weights shrunk tenfold or more after a sound start: the decay outweighs the gradient. Under
    SGD the step is lr·(g + λw), so the weights settle where λ‖w‖ ≈ ‖g‖: λ cut by the shrink's
    power of ten lets them settle back near their initial scale (SGD, weight_decay 1 on digits,
    norm 9.0 -> 0.05: 0.1 still collapsed, 1e-3 reached loss 0.06). Re-initialising would only
    restart the decay."""
    causes = [f"weight decay: the weights shrank to {evidence['weight_shrink']:.2g} of their first norm: the decay "
              "(weight_decay, or an L2 term in the loss) outweighs the gradient, each layer's output and backward gain "
              "fall with its weights, and a higher learning rate would decay them faster (lr x weight_decay a step)"]
    cut = min(0.1, 10.0 ** math.floor(math.log10(evidence["weight_shrink"])))  # ‖w‖ ∝ 1/λ: back to the init's scale
    fold = f"{1 / cut:.0f}-fold" if cut >= 1e-4 else f"{1 / cut:.0e}-fold"
    remedies = [Remedy(f"Weaken the weight decay {fold}, so the weights can settle back near their initial scale "
                       "(they settle where weight_decay x ‖w‖ ≈ ‖g‖)",
                       f"for group in optimizer.param_groups: group['weight_decay'] *= {cut:g}  # or the L2 term's factor"),
                Remedy("Normalise the pre-activations so each layer's backward gain stays near 1", INSERT_NORM_CODE)]
    return causes, remedies
