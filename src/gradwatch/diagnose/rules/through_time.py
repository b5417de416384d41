"""Vanishing or exploding *through time* in recurrent layers, from the gradient w.r.t. each time
step's input. Parameter-level norms can look normal while early time steps get no gradient."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.rules.loss import loss_fell_to
from gradwatch.diagnose.signals import from_init, lowest_activation, persistent_activation_layers, persistent_start, time_ratio
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def find_through_time(run: RunSeries, th: Thresholds) -> list[Finding]:
    findings = []
    ctx = advice.Context(run)
    # a recurrent layer whose tanh is pinned at ±1: diag(f'(h_t)) ~ 0 is the product's small factor (a
    # tester's RNN on raw sensor values, ±700, was told of its W_hh's norm)
    saturated = persistent_activation_layers(run, "saturated", th.saturated_fraction, th.persist_samples,
                                             only=advice.SATURATING)
    lowest = lowest_activation(run)
    for layer, (steps, profile) in run.time_profiles.items():
        if profile.shape[1] < th.min_time_steps or len(steps) == 0:
            continue
        ratios = time_ratio(profile)
        for kind, cond, word in (
            ("vanishing_gradient", ratios < th.time_vanishing_ratio, "shrinks"),
            ("exploding_gradient", ratios > th.time_exploding_ratio, "grows"),
        ):
            # recurrent nets routinely start with a short memory and learn a long one (an LSTM
            # opening its forget gates): what counts is whether it still vanishes at the end
            start = persistent_start(cond & np.isfinite(ratios), th.persist_samples, to_the_end=True)
            if start is None:
                continue
            last = profile[-1]
            ratio = float(np.median(ratios[start:][np.isfinite(ratios[start:])]))
            rate = float(ratio ** (1.0 / (profile.shape[1] - 1)))
            evidence = {"start_over_end": ratio, "per_step_factor": rate, "sequence_length": int(profile.shape[1]),
                        "profile_last": [float(v) for v in last], "at_init": start == 0 and from_init(run)}
            explain = advice.vanishing if kind == "vanishing_gradient" else advice.exploding
            causes, remedies = explain(ctx, (layer,), evidence, through_time=True)
            # f'(h_t) ~ 0: the saturation's first; the inputs' scale only if saturated from the first step
            # (a tester's GRU on standardised inputs, saturated from step 30, was told to standardise them)
            if kind == "vanishing_gradient" and layer in saturated:
                evidence["saturated_fraction"] = saturated[layer][1]
                own, fix = advice.saturation(ctx, (layer,), {"at_init": saturated[layer][2],
                                                             "first_layer": layer == lowest and saturated[layer][2]})
                causes, remedies = [*own, *causes], [*fix[:1], *remedies]
            if ratio > 0:
                what = (f"the gradient {word} by {rate:.3g}x per step: the first of {profile.shape[1]} steps gets "
                        f"{ratio:.1e} of the last step's gradient")
            else:
                what = f"no gradient reaches the first of {profile.shape[1]} steps (it underflows to 0)"
            message = f"Through time in {layer}, {what} since step {int(steps[start])}. {remedies[0].action}."
            severity = "error" if kind == "exploding_gradient" else "warning"
            learnt = loss_fell_to(run, th, th.time_learnt_loss) if kind == "vanishing_gradient" else None
            # ... and went on falling, by a fifth or more from its level a quarter into the run: a
            # regression that learnt its targets' mean fell 0.94 -> 0.17 early and then stayed (a
            # vanilla RNN on the adding problem, at the mean's loss 0.1675)
            quarter = int(run.steps[len(run.steps) // 4]) if len(run.steps) else 0
            if learnt is not None and loss_fell_to(run, th, 0.8, since=quarter) is None:
                learnt = None
            if learnt is not None:  # the task did not need the sequence's start
                evidence["loss_start_end"] = list(learnt)
                severity = "info"
                message = (f"Through time in {layer}, {what} since step {int(steps[start])}; the loss still fell "
                           f"{learnt[0]:.4g} -> {learnt[1]:.4g}, so this task needs little long-range memory. If "
                           f"it needs more: {advice.continued(remedies[0].action)}.")
            findings.append(Finding(kind, severity, int(steps[start]), (layer,), message, evidence,
                                    tuple(causes), tuple(remedies)))
    return findings

