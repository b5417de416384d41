"""dead_units: ReLU-family layers where most units output 0 for every sample of the batch, and
layers that get exactly zero gradient because nothing above them passes any back."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.signals import persistent_activation_layers, persistent_start, summarise_layers
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
        first, layers, worst, at_init = summarise_layers(run, hits)
        evidence.update({"dead_fraction": {n: hits[n][1] for n in layers}, "at_init": at_init})
        causes, remedies = advice.dead_units(advice.Context(run), layers, evidence)
        severity = "error" if worst >= th.dead_fraction_error else "warning"
        message = (f"{worst:.0%} of the units of '{layers[0]}' output 0 for every sample since step {first}"
                   + (f" ({len(layers)} layers affected)" if len(layers) > 1 else "")
                   + f": they pass no gradient and cannot recover. {remedies[0].action}.")
        return [Finding("dead_units", severity, first, layers, message, evidence, tuple(causes), tuple(remedies))]
    first = min(zero.values())
    evidence["at_init"] = first == int(run.steps[0])
    causes, remedies = advice.dead_units(advice.Context(run), zero_layers, evidence)
    shown = ", ".join(f"'{n}'" for n in zero_layers[:3]) + (f" and {len(zero_layers) - 3} more" if len(zero_layers) > 3 else "")
    message = (f"{shown} get exactly zero gradient since step {first}: nothing above passes any back (ReLU "
               f"units that output 0 for every sample, or weights above that are all zero), so they cannot "
               f"learn. {remedies[0].action}.")
    return [Finding("dead_units", "error", first, zero_layers, message, evidence, tuple(causes), tuple(remedies))]


def _zero_gradient_layers(run: RunSeries, th: Thresholds) -> dict[str, int]:
    """{layer: first step} for weight layers whose gradient norm is exactly 0 for at least
    `zero_gradient_steps` recorded steps through the end (or the first non-finite loss), while a
    layer after them in the forward gets gradient: blocked below something that passes none back.
    A head whose output the loss multiplies by 0 (DDP's trick for unused parameters) runs last,
    with nothing after it, and is not one."""
    g = run.metrics.get("grad_norm")
    if g is None:
        return {}
    bad = np.flatnonzero(np.isinf(run.loss))  # after it, what the gradients show is that
    end = bad[0] if len(bad) else len(run.steps)
    weights = [c for c, layer in enumerate(run.layers) if layer.role in ("param", "recurrent")]
    out = {}
    for c in weights:
        rows = np.flatnonzero(np.isfinite(g[:end, c]))  # NaN: no gradient this step (a branch not run)
        if len(rows) < th.zero_gradient_steps:
            continue
        start = persistent_start(g[rows, c] == 0, th.zero_gradient_steps, to_the_end=True)
        if start is None:
            continue
        after = [a for a in weights if run.layers[a].index > run.layers[c].index]
        if after and (np.nan_to_num(g[rows[start:]][:, after]) > 0).any():
            out[run.layers[c].name] = int(run.steps[rows[start]])
    return out
