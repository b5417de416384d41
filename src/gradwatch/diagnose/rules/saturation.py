"""saturation: sigmoid/tanh-like layers whose outputs sit at an asymptote, where the derivative
is below 0.01 and the gradient through them all but vanishes."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.rules.loss import learning_on, loss_fell_to, sampled_onset
from gradwatch.diagnose.signals import hidden_layers, lowest_activation, persistent_activation_layers, quoted, summarise_layers
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def find_saturation(run: RunSeries, th: Thresholds) -> list[Finding]:
    hits = persistent_activation_layers(run, "saturated", th.saturated_fraction, th.persist_samples, only=advice.SATURATING)
    # the output's own activation (a sigmoid before BCELoss) saturates when its predictions are
    # confident, which is the aim: the loss's gradient at the logit is p - y, not through σ'; so is
    # a head's that another head runs after (`hidden_layers`)
    hidden = hidden_layers(run)
    hits = {n: h for n, h in hits.items() if n in hidden}
    if not hits:
        return []
    first, layers, worst_layer, worst, at_init = summarise_layers(run, hits)
    evidence = {"saturated_fraction": {n: hits[n][1] for n in layers},
                "activations": [run.layers[run.column(n)].activation for n in layers], "at_init": at_init}
    # the layer the inputs feed saturates from the start, and it alone: layers above take its outputs,
    # bounded in [-1, 1], and initialised for their fan-in do not saturate on them; saturated from the
    # start too, the weights are too large (a tester's 16-layer tanh MLP at N(0, 1) on standardised
    # inputs was told to standardise them)
    if at_init and lowest_activation(run) == layers[0] and [n for n in layers if hits[n][2]] == [layers[0]]:
        evidence["first_layer"] = True
    causes, remedies = advice.saturation(advice.Context(run), layers, evidence)
    said = (f"{worst:.0%} of the outputs of {quoted(run, worst_layer)} sit within 1% of an asymptote since step {first}"
            + (f" ({len(layers)} layers affected)" if len(layers) > 1 else ""))
    # the units saturated somewhere after the last sample that did not show it: the loss they could
    # block is the loss from there (full-batch L-BFGS was at 3e-7, down from 2.3, by its first
    # saturated sample: its loss fell after the onset, only before the sample that saw it)
    learning = None if at_init else loss_fell_to(run, th, th.saturation_learning,
                                                 since=sampled_onset(run, "saturated", first))
    if learning is not None:
        return learning_on("saturation", first, layers, said, learning, "confident units, no block to learning yet",
                           "the layers below must learn more", evidence, causes, remedies)
    message = f"{said}: almost no gradient passes. {remedies[0].action}."
    return [Finding("saturation", "warning", first, layers, message, evidence, tuple(causes), tuple(remedies))]

