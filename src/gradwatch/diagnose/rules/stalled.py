"""stalled_layers: lower layers whose updates are far smaller than the upper layers', weights that
stop changing altogether although gradients arrive, and lower layers no gradient reaches at all."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.rules.loss import loss_fell_to
from gradwatch.diagnose.signals import (depth_profile, lowest_over_highest, names, persistent_start, profile_columns,
                                        row_reduce, rows_before_non_finite_loss, sampled_rows)
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def find_stalled(run: RunSeries, th: Thresholds) -> list[Finding]:
    cut = _cut_off(run, th) + _outside_off_profile(run, th)
    rows, u, cols = depth_profile(run, "update_ratio")
    if len(rows) == 0:
        return cut
    g = run.metrics["grad_norm"][rows][:, cols]
    lr = run.lr[rows]
    w = run.metrics["weight_norm"][rows][:, cols] if "weight_norm" in run.metrics else np.full_like(g, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        starved = lr[:, None] * g / w < th.frozen_expected  # False where lr (by hand) or |w| is unknown
    # no update although a gradient that should move the weights arrived and the learning rate is not 0
    frozen = (u <= th.frozen_update) & (g > 0) & np.isfinite(g) & ~(lr[:, None] == 0) & ~starved
    ctx = advice.Context(run)
    findings = cut
    frozen_at = {c: persistent_start(frozen[:, j], th.persist_samples) for j, c in enumerate(cols)}
    # layers whose only optimizer stopped stepping (on purpose: an encoder's warm-up) froze for that reason
    stop = {name: step for step, layers in run.meta.get("optimizer_stopped") or [] for name in layers}
    done = {c for c, k in frozen_at.items() if k is not None and run.steps[rows[k]] >= stop.get(run.layers[c].name, np.inf) - 1}
    frozen_cols = [c for c in cols if frozen_at[c] is not None and c not in done]
    outside = set(run.meta.get("outside_optimizers") or [])
    if frozen_cols and set(frozen_cols) >= set(cols) and not run.meta.get("own_loss_steps") \
            and not outside & {run.layers[c].name for c in frozen_cols} \
            and loss_fell_to(run, th, th.stalled_loss_fell, since=int(run.steps[rows[min(frozen_at[c] for c in frozen_cols)]])):
        # every weight still at the sampled steps while the loss fell since: they change between the
        # samples (a tester's gw.watch(model) without its optimizer, two micro-batches per step:
        # every 10th backward, always the first of a pair, saw no update; told "All weights stopped
        # changing" while its validation error halved). Not weights known to be in no optimizer, nor
        # under a GAN's mixed loss, which falls with the other model's training (a generator given
        # the discriminator's parameters by a typo)
        done.update(frozen_cols)
        frozen_cols = []
    if ctx.line_search and frozen_cols:
        # L-BFGS stops every weight at once when its own convergence test passes (tolerance_grad,
        # tolerance_change): a full-batch run at its minimum, not a stall. Weights it holds that
        # stop while others still move stay a finding.
        since = min(frozen_at[c] for c in frozen_cols)
        if not (u[since:] > th.frozen_update).any():
            done.update(frozen_cols)
            frozen_cols = []
    # in no optimizer: forgotten, or a backbone frozen on purpose but left requires_grad (head-only
    # fine-tuning); the run trains either way, so this is a warning that says both
    for group, severity in (([c for c in frozen_cols if run.layers[c].name not in outside], "error"),
                            ([c for c in frozen_cols if run.layers[c].name in outside], "warning")):
        if group:
            findings.append(_frozen(run, ctx, group, frozen_at, rows, cols, u, g, severity))
    if len(cols) < th.min_profile_layers:
        return findings
    live = [j for j, c in enumerate(cols) if c not in frozen_cols and c not in done]
    # param groups at different learning rates (a backbone at lr/1000 on purpose): updates are
    # compared per unit of learning rate (Δw ∝ lr under SGD and Adam alike), so a layer slowed by
    # its own lr is not stalled, and one stalled beyond it still is; a group below
    # `discriminative_lr_floor` is no fine-tuning scheme's and is judged as it moves (a group at lr 0
    # is left out here: the frozen and no-optimizer findings say it)
    scale = run.meta.get("lr_scale") or {}
    group_lr = np.array([scale.get(run.layers[c].name, 1.0) for c in cols], dtype=float)
    per_lr = np.where(group_lr >= th.discriminative_lr_floor, group_lr, np.where(group_lr > 0, 1.0, 0.0))
    # an update of exactly 0 is no small update: a group at lr 0 for a while (the stored scale is the
    # last flush's), weights in no optimizer, a layer cut off: the frozen, outside and cut-off rules'
    # (a tester's body at lr 0 for 150 steps, then 1e-4, was 'stalled since step 150', 0.99x the head's)
    with np.errstate(divide="ignore", invalid="ignore"):
        u_per_lr = np.where((per_lr > 0) & (u != 0), u / per_lr, np.nan)
    ratios = lowest_over_highest(u_per_lr[:, live]) if len(live) >= 2 else np.empty(0)
    start = persistent_start(ratios < th.stalled_ratio, th.persist_samples)
    if start is None:
        return findings + _slowed_group(run, th, rows, u, cols, live, group_lr, ctx)
    first = int(run.steps[rows[start]])
    last, last_per_lr = u[-1], u_per_lr[-1]
    top = np.nanmax(last_per_lr[np.isfinite(last_per_lr)]) if np.isfinite(last_per_lr).any() else np.nan
    layers = names(run, [c for c, v in zip(cols, last_per_lr) if np.isfinite(v) and v < th.stalled_ratio * top] or cols[:1])
    ratio = float(np.nanmedian(ratios[start:]))
    evidence = {"update_ratio_ratio": ratio, "update_ratio": {run.layers[c].name: float(v) for c, v in zip(cols, last)}}
    tiny_lr = {run.layers[c].name: float(v) for c, v in zip(cols, group_lr)
               if v < th.discriminative_lr_floor and run.layers[c].name in layers}
    if tiny_lr:
        evidence["lr_scale"] = tiny_lr
    causes, remedies = advice.stalled(ctx, layers, evidence)
    findings.append(Finding("stalled_layers", "warning", first, layers,
                            f"'{layers[0]}' updates {ratio:.1e} as much as the layers above it since step {first}: "
                            f"it has stopped learning. {remedies[0].action}.", evidence, tuple(causes), tuple(remedies)))
    return findings


def _slowed_group(run: RunSeries, th: Thresholds, rows: np.ndarray, u: np.ndarray, cols: list[int], live: list[int],
                  group_lr: np.ndarray, ctx: advice.Context) -> list[Finding]:
    """Layers whose param group's lr is below `discriminative_lr_floor` of the largest, anywhere in
    the model, updating below `stalled_ratio` of the other layers: the depth profile compares the
    lowest layer only, and a two-tower recommender whose item tower sat at lr 1e-7 beside 1e-3 (a
    typo; loss 0.54 against 0.14) had no finding."""
    slow = [j for j in live if 0 < group_lr[j] < th.discriminative_lr_floor]
    rest = [j for j in live if group_lr[j] >= th.discriminative_lr_floor]
    if not slow or not rest:
        return []
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = row_reduce(np.nanmax, u[:, slow]) / row_reduce(np.nanmedian, np.where(u[:, rest] > 0, u[:, rest], np.nan))
    start = persistent_start(np.isfinite(ratio) & (ratio < th.stalled_ratio), th.persist_samples, to_the_end=True)
    if start is None:
        return []
    first, layers = int(run.steps[rows[start]]), names(run, [cols[j] for j in slow])
    median = float(np.nanmedian(ratio[start:]))
    evidence = {"update_ratio_ratio": median, "update_ratio": {run.layers[cols[j]].name: float(u[-1, j]) for j in slow},
                "lr_scale": {run.layers[cols[j]].name: float(group_lr[j]) for j in slow}}
    causes, remedies = advice.stalled(ctx, layers, evidence)
    return [Finding("stalled_layers", "warning", first, layers,
                    f"{', '.join(repr(n) for n in layers[:3])} update {median:.1e} as much as the other layers since step "
                    f"{first}, in a param group at {min(evidence['lr_scale'].values()):.2g} of the largest lr: they "
                    f"barely learn. {remedies[0].action}.", evidence, tuple(causes), tuple(remedies))]


def _outside_off_profile(run: RunSeries, th: Thresholds) -> list[Finding]:
    """Weights in no optimizer seen stepping that the depth profile leaves out (an embedding, a
    norm layer): the profile's ratios cannot see them, yet they never change (an nn.Embedding
    (sparse=True) whose SparseAdam was built but never stepped, beside a dense part under Adam:
    the head learnt on fixed random vectors, 0.23 -> 0.18, with no finding)."""
    outside = set(run.meta.get("outside_optimizers") or [])
    profile = set(profile_columns(run))
    extra = [c for c in run.weight_columns() if c not in profile and run.layers[c].name in outside]
    rows = sampled_rows(run, "update_ratio", extra)
    if len(rows) == 0:
        return []
    u, g = run.metrics["update_ratio"][rows][:, extra], run.metrics["grad_norm"][rows][:, extra]
    frozen = (u <= th.frozen_update) & (g > 0) & np.isfinite(g)
    frozen_at = {c: persistent_start(frozen[:, j], th.persist_samples) for j, c in enumerate(extra)}
    group = [c for c in extra if frozen_at[c] is not None]
    return [_frozen(run, advice.Context(run), group, frozen_at, rows, extra, u, g, "warning")] if group else []


def _frozen(run: RunSeries, ctx: advice.Context, frozen_cols: list[int], frozen_at: dict, rows: np.ndarray,
            cols: list[int], u: np.ndarray, g: np.ndarray, severity: str) -> Finding:
    first = int(run.steps[rows[min(frozen_at[c] for c in frozen_cols)]])
    layers = names(run, frozen_cols)
    outside = severity == "warning"
    evidence = {"frozen": True, "outside_optimizers": outside,
                "update_ratio": {n: float(u[-1, cols.index(c)]) for n, c in zip(layers, frozen_cols)},
                "grad_norm": {n: float(g[-1, cols.index(c)]) for n, c in zip(layers, frozen_cols)}}
    causes, remedies = advice.stalled(ctx, layers, evidence)
    if set(frozen_cols) >= set(run.weight_columns()) or (len(frozen_cols) == len(cols) and set(cols) == set(profile_columns(run))):
        evidence["all_weights"] = True  # (the loss's plateau is theirs: `diagnose._one_per_cause`)
    every = "All weights" if evidence.get("all_weights") else f"The weights of {', '.join(layers[:3])}"
    said = (f"{every} get gradients but no optimizer updates them (they are in none, or in a param group at lr 0), so they never change. If they should train, "
            f"give them to the optimizer; if they are frozen on purpose, set requires_grad_(False) on them "
            f"and backward skips them.") if outside else \
        f"{every} stopped changing at step {first} although gradients arrive. {remedies[0].action}."
    return Finding("stalled_layers", severity, first, layers, said, evidence, tuple(causes), tuple(remedies))


def _cut_off(run: RunSeries, th: Thresholds) -> list[Finding]:
    """The weight layers nearest the input, from the first on, that ran in the forward pass but got
    no gradient at all (not even 0) on any of at least `zero_gradient_steps` recorded steps, while
    a layer above them got one: the autograd graph is cut between them (a stray `.detach()`,
    `.data`, `torch.no_grad()`, a reentrant checkpoint on an input that needs no grad). Their
    weights never change, and no update ratio shows it: with no gradient there is nothing to
    measure. Only the input side counts, as for exact zeros: a layer that never ran (an expert
    given no token) is numbered above the output, and a frozen one (requires_grad off when the
    watch began, or in no optimizer) is no layer or is said apart."""
    if run.meta.get("own_loss_steps"):  # several objectives (a GAN watched with D's optimizer): G's layers
        return []  # run under D's fake.detach() by design and get their gradient in G's own backward, unseen
    skip = set(run.meta.get("outside_optimizers") or []) | {
        n for _, layers in run.meta.get("optimizer_stopped") or [] for n in layers}
    cols = [c for c in run.weight_columns() if run.layers[c].name not in skip]
    g = run.metrics.get("grad_norm")
    if g is None or len(cols) < 2:
        return []
    g = g[:rows_before_non_finite_loss(run), cols]  # (one table, not the rows then their columns)
    got = ~np.isnan(g)  # NaN: nothing arrived; inf is a gradient that overflowed (a GradScaler's skipped step)
    rows = np.flatnonzero(got.any(axis=1))
    if len(rows) < th.zero_gradient_steps:
        return []
    ever = got[rows].any(axis=0)
    k = int(np.argmax(ever))  # the leading layers that never got a gradient
    if k == 0 or not ever.any():
        return []
    layers, above = names(run, cols[:k]), run.layers[cols[k]].name
    first = int(run.steps[rows[0]])
    evidence = {"no_gradient": True, "steps_without_gradient": len(rows), "first_layer_with_gradient": above}
    causes, remedies = advice.cut_off(layers, above)
    # a warning, as for weights in no optimizer: the same record is a backbone run under no_grad on purpose
    return [Finding("stalled_layers", "warning", first, layers,
                    f"{advice.listed(layers)} ran in the forward pass but got no gradient in {len(rows)} steps "
                    f"while '{above}' above {'it' if len(layers) == 1 else 'them'} did: the graph is cut below "
                    f"'{above}', so they never learn. {remedies[0].action}; or, if they run under torch.no_grad() "
                    "on purpose (a frozen backbone), requires_grad_(False) says so.", evidence, tuple(causes),
                    tuple(remedies))]
