"""dead_units: ReLU-family layers where most units output 0 for every sample of the batch, and
layers that get exactly zero gradient because nothing above them passes any back."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.rules.eval_mode import eval_mode_first, unnormalised_batchnorm
from gradwatch.diagnose.rules.loss import learning_on, loss_fell_to, sampled_onset, still_falling
from gradwatch.diagnose.signals import (quoted, first_layer_scale, from_init, persistent_activation_layers, persistent_start, rows_before_non_finite_loss,
                                        summarise_layers, zero_initialised)
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def find_dead_units(run: RunSeries, th: Thresholds) -> list[Finding]:
    hits = persistent_activation_layers(run, "dead", th.dead_fraction, th.persist_samples, exclude=advice.SATURATING)
    zero = _zero_gradient_layers(run, th)
    if not hits and not zero:
        return []
    zero_layers = tuple(sorted(zero, key=lambda n: run.layers[run.column(n)].index))
    evidence: dict = {}
    if zero:
        evidence["zero_gradient_layers"] = list(zero_layers)
    if hits:
        first, layers, worst_layer, worst, at_init = summarise_layers(run, hits)
        start = _at_first_sample(run, worst_layer) if at_init else float("nan")
        rose = worst - start >= th.dead_rise  # (a tester's ReLU net: 58% at step 0, 100% by step 30 at lr 1)
        evidence.update({"dead_fraction": {n: hits[n][1] for n in layers}, "at_init": at_init and not rose})
        if rose:
            evidence["dead_at_start"] = start
        if (scale := first_layer_scale(run, th.input_scale_std)) is not None:
            evidence["first_layer_std"] = scale
        if at_init and (zeros := zero_initialised(run)):
            evidence["zero_weight_layers"] = zeros
        elif at_init and (frozen := unnormalised_batchnorm(run, th)):
            evidence["eval_mode_batchnorm"], evidence["act_std_after_batchnorm"] = frozen
        causes, remedies = advice.dead_units(advice.Context(run), layers, evidence)
        if "eval_mode_batchnorm" in evidence:
            causes, remedies = eval_mode_first(evidence, causes, remedies)
        said = (f"{worst:.0%} of the units of {quoted(run, worst_layer)} output 0 for every sample since step {first}"
                + (f" ({start:.0%} at the first step)" if rose else "")
                + (f" ({len(layers)} layers affected)" if len(layers) > 1 else ""))
        # weight layers cut off from any gradient below them: a block to learning, however the loss fell
        learning = None if at_init or worst >= th.dead_fraction_error or zero else \
            loss_fell_to(run, th, th.dead_learning, since=sampled_onset(run, "dead", first))
        if learning is not None and _steps_killed(run, first, th) and not still_falling(run, th):
            learning = None  # killed by the step size, the loss halved and stalled: lower than it could go
        if learning is not None:
            return learning_on("dead_units", first, layers, said, learning, "capacity lost, no block to learning",
                               "the model needs more", evidence, causes, remedies)
        severity = "error" if worst >= th.dead_fraction_error else "warning"
        message = f"{said}: they pass no gradient and cannot recover. {remedies[0].action}."
        return [Finding("dead_units", severity, first, layers, message, evidence, tuple(causes), tuple(remedies))]
    first = min(zero.values())
    evidence["at_init"] = first == int(run.steps[0]) and from_init(run)
    if evidence["at_init"] and (zeros := zero_initialised(run)):
        evidence["zero_weight_layers"] = zeros
    causes, remedies = advice.dead_units(advice.Context(run), zero_layers, evidence)
    if causes[0].startswith("saturation:"):  # recurrent layers: their own gates (advice.dead_units)
        message = (f"{advice.listed(zero_layers)} {_get(zero_layers)} exactly zero gradient since step {first}: their tanh "
                   f"and sigmoid gates are saturated, so they cannot learn. {remedies[0].action}.")
        return [Finding("dead_units", "error", first, zero_layers, message, evidence, tuple(causes), tuple(remedies))]
    why = ("weights above that are all zero" if "zero_weight_layers" in evidence else
           "ReLU units that output 0 for every sample, weights above that are all zero, or a function whose "
           "derivative is 0 there: torch.round, sign, a custom autograd.Function's backward")
    message = (f"{advice.listed(zero_layers)} {_get(zero_layers)} exactly zero gradient since step {first}: nothing above "
               f"passes any back ({why}), so {'they' if len(zero_layers) > 1 else 'it'} cannot learn. {remedies[0].action}.")
    return [Finding("dead_units", "error", first, zero_layers, message, evidence, tuple(causes), tuple(remedies))]


def _get(layers: tuple[str, ...]) -> str:
    return "get" if len(layers) > 1 else "gets"


def _steps_killed(run: RunSeries, first: int, th: Thresholds) -> bool:
    """The step size plausibly killed the units: an adaptive optimizer at a high lr, or a sampled
    update of a weight layer in the window before their death `dying_update_ratio` of its weights
    or more.
    Units it killed are capacity it took, and the loss it left can stall far higher (Adam 0.05: 73%
    dead, loss 0.31 where 1e-3 reaches 0.024). Not every SGD run: advice names its lr always, and a
    converged SGD run's dead units (60%, loss 1.15 -> 0.11, flat at the end) were called a block."""
    ctx = advice.Context(run)
    if ctx.adaptive:
        return ctx.lr >= advice.ADAPTIVE_HIGH_LR
    u = run.metrics.get("update_ratio")
    if u is None:
        return False
    upto = int(np.searchsorted(run.steps, first, side="right"))
    since = int(np.searchsorted(run.steps, first - th.baseline_window))
    ratios = np.asarray(u[since:upto, run.weight_columns()], dtype=float)
    return bool(np.isfinite(ratios).any() and np.nanmax(ratios) >= th.dying_update_ratio)


def _some_entry_nonzero(run: RunSeries, column: int, rows: np.ndarray) -> bool:
    """A norm of 0 with an entry that is not (max |g| > 0 on a sampled step): entries below 1e-19
    square to 0 in float32, so a vanished gradient's norm reads 0 where a cut-off one is 0."""
    gmax = run.metrics.get("grad_max")
    return gmax is not None and bool((np.nan_to_num(gmax[rows, column]) > 0).any())


def _zero_gradient_layers(run: RunSeries, th: Thresholds) -> dict[str, int]:
    """{layer: first step} for the weight layers nearest the input, from the first on, whose
    gradient norm is exactly 0 for at least `zero_gradient_steps` recorded steps through the end
    (or the first non-finite loss), while a layer after them gets gradient: the input side is cut
    off below something that passes none back. A layer elsewhere with exact zeros usually has a
    reason (an expert given no token, a head whose loss term is 0 or weighted 0, a pruned
    block) and is not one."""
    g = run.metrics.get("grad_norm")
    if g is None:
        return {}
    end = rows_before_non_finite_loss(run)
    weights = run.weight_columns()
    out: dict[str, int] = {}
    for k, c in enumerate(weights):  # input first, while they are cut off
        rows = np.flatnonzero(np.isfinite(g[:end, c]))  # NaN: no gradient this step (a branch not run)
        if len(rows) < th.zero_gradient_steps:
            break
        start = persistent_start(g[rows, c] == 0, th.zero_gradient_steps, to_the_end=True)
        if start is None or _some_entry_nonzero(run, c, rows[start:]):
            break
        out[run.layers[c].name] = int(run.steps[rows[start]])
    after = weights[len(out):]
    if not out or not after or not (np.nan_to_num(g[:end, after]) > 0).any():
        return {}  # nothing gets gradient: no loss term reaches the weights at all, another finding's
    return out


def _at_first_sample(run: RunSeries, layer: str) -> float:
    """The layer's dead fraction at its first sampled step."""
    values = run.metrics["dead"][:, run.column(layer)]
    recorded = np.flatnonzero(np.isfinite(values))
    return float(values[recorded[0]]) if len(recorded) else float("nan")
