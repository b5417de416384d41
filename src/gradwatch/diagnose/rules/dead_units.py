"""dead_units: ReLU-family layers where most units output 0 for every sample of the batch."""

from __future__ import annotations

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.signals import persistent_activation_layers, summarise_layers
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def find_dead_units(run: RunSeries, th: Thresholds) -> list[Finding]:
    hits = persistent_activation_layers(run, "dead", th.dead_fraction, th.persist_samples, exclude=advice.SATURATING)
    if not hits:
        return []
    first, layers, worst, at_init = summarise_layers(run, hits)
    evidence = {"dead_fraction": {n: hits[n][1] for n in layers}, "at_init": at_init}
    causes, remedies = advice.dead_units(advice.Context(run), layers, evidence)
    severity = "error" if worst >= th.dead_fraction_error else "warning"
    message = (f"{worst:.0%} of the units of '{layers[0]}' output 0 for every sample since step {first}"
               + (f" ({len(layers)} layers affected)" if len(layers) > 1 else "")
               + f": they pass no gradient and cannot recover. {remedies[0].action}.")
    return [Finding("dead_units", severity, first, layers, message, evidence, tuple(causes), tuple(remedies))]
