"""The detectors people use today, re-implemented on the same recorded series as gradwatch.

Each returns {kind: first_step} for the kinds it would report.

* `terminate_on_nan`: Keras' TerminateOnNaN / a `if not math.isfinite(loss)` check: reports
  `non_finite` at the first step whose loss is NaN or Inf, and nothing else.
* `autotrainer`: the rules of AutoTrainer (Zhang et al., ICSE 2021, `utils/monitor.py`), checked
  every `CHECK_EVERY` steps (AutoTrainer checks every 3 epochs; our runs are a few hundred steps of
  5-25 steps an epoch, so every 10 steps is as often or more often, which can only help it).
  With g_first, g_last the gradient norms of the first and last layers with parameters:
    - vanishing_gradient: g_first / g_last < 1e-3 and g_first < 1e-4
    - exploding_gradient: g_first / g_last > 70, or a non-finite gradient or loss, or loss >= 1e3
    - dead_units ("dying ReLU"): >= 70% of all gradient entries exactly 0
    - non_finite: AutoTrainer's NaN check (any NaN/Inf in the gradients); we also let it see the loss.
  Approximations, forced by what is recorded: g_i is the norm over the layer's weight *and* bias
  (AutoTrainer uses the kernel only); "70% of gradient entries are 0" is read as the mean, over
  the ReLU layers, of the fraction of units that output 0 for the whole batch (the incoming weights
  of such a unit get exactly zero gradient), or every layer's gradient norm being exactly 0.
"""

from __future__ import annotations

import numpy as np

CHECK_EVERY = 10
RELU_FAMILY = {"relu", "relu6", "leaky_relu", "leakyrelu", "elu", "selu", "gelu", "silu"}


def _nonfinite_loss_steps(rs) -> np.ndarray:
    """Steps whose loss was NaN/Inf. The store keeps a NaN loss as NULL (read back as NaN), so a
    NaN in a run that recorded finite losses at all is a NaN the training loop saw."""
    if not np.isfinite(rs.loss).any():
        return np.empty(0, dtype=np.int64)
    return rs.steps[~np.isfinite(rs.loss)]


def terminate_on_nan(rs) -> dict[str, int]:
    bad = _nonfinite_loss_steps(rs)
    return {"non_finite": int(bad[0])} if len(bad) else {}


def _param_columns(rs) -> list[int]:
    cols = [i for i, l in enumerate(rs.layers) if l.role in ("param", "recurrent") and l.n_params > 0]
    return sorted(cols, key=lambda i: rs.layers[i].index)


def autotrainer(rs, every: int = CHECK_EVERY) -> dict[str, int]:
    found: dict[str, int] = {}
    cols = _param_columns(rs)
    if not cols:
        return found
    first, last = cols[0], cols[-1]
    relu = [i for i, l in enumerate(rs.layers) if l.role == "activation" and l.activation.lower() in RELU_FAMILY]
    gn, dead = rs.metrics["grad_norm"], rs.metrics["dead"]
    bad_loss = set(_nonfinite_loss_steps(rs).tolist())

    def hit(kind: str, step: int) -> None:
        found.setdefault(kind, int(step))

    for row, step in enumerate(rs.steps):
        if step % every:
            continue
        g = gn[row, cols]
        g_first, g_last = gn[row, first], gn[row, last]
        loss = rs.loss[row]
        nonfinite = np.isinf(g).any() or step in bad_loss
        if nonfinite:
            hit("non_finite", step)
            hit("exploding_gradient", step)
        elif np.isfinite(g_first) and np.isfinite(g_last) and g_last > 0:
            ratio = g_first / g_last
            if ratio < 1e-3 and g_first < 1e-4:
                hit("vanishing_gradient", step)
            if ratio > 70:
                hit("exploding_gradient", step)
        if np.isfinite(loss) and loss >= 1e3:
            hit("exploding_gradient", step)
        d = dead[row, relu] if relu else np.empty(0)
        d = d[~np.isnan(d)]
        recorded = g[~np.isnan(g)]
        all_zero = len(recorded) > 0 and (recorded == 0).all()
        if (len(d) and d.mean() >= 0.7) or all_zero:
            hit("dead_units", step)
    return found


BASELINES = {"TerminateOnNaN": terminate_on_nan, "AutoTrainer": autotrainer}
