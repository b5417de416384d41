"""loss_plateau and loss_divergence, from robust windows of the loss (medians, so mini-batch noise
does not trip them)."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.diagnose.rules.decay import decayed, weight_shrink
from gradwatch.diagnose.signals import (finite_loss, from_init, optimizer_switches, peaks_growing, periodic, profile_columns,
                                        total_grad_norm, window)
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def start_window(n: int, th: Thresholds) -> int:
    """Steps that stand for "the start": a tenth of the run, but never more than 50 steps, so a
    long run that learnt early is compared with where it began, not with where it converged."""
    return min(window(n, th.min_loss_window), max(th.min_loss_window, 50))


def sampled_onset(run: RunSeries, metric: str, first: int) -> int:
    """The last sampled step of `metric` before `first`, else `first`: a state first seen at a sample
    began somewhere after the sample before it, and the loss it could block is the loss from there."""
    sampled = run.steps[np.isfinite(run.metrics[metric]).any(axis=1)]
    before = sampled[sampled < first]
    return int(before[-1]) if len(before) else first


def loss_fell_to(run: RunSeries, th: Thresholds, fraction: float, since: int | None = None) -> tuple[float, float] | None:
    """(loss at the start, or around step `since`; loss at the end) when the end is at most
    `fraction` of it: the run learnt. Medians of a window (a tenth of the run); None for a run
    with a non-finite loss, too short to tell, or `since` within the last window. Nor where the end
    is above twice the first step's loss, before any update: a fall from a blow-up is no learning
    (a tester's AdamW at lr 50: 0.79 -> 511 in two steps, 33 at the end, its saturated tanh layers
    read as "confident units, no block to learning yet")."""
    steps, loss = finite_loss(run)
    if np.isinf(run.loss).any() or len(loss) < th.min_loss_steps:
        return None
    w = window(len(loss), th.min_loss_window)
    if since is None:
        start = float(np.median(loss[:start_window(len(loss), th)]))
    else:
        i = int(np.searchsorted(steps, since))
        if i + w >= len(loss):
            return None
        first = max(i - w // 2, 0)
        start = float(np.median(loss[first:first + w]))
    end = float(np.median(loss[-w:]))
    above_start = loss[0] > 0 and end > 2 * float(loss[0])
    return (start, end) if start > 0 and end <= fraction * start and not above_start else None


def learning_on(kind: str, first: int, layers: tuple[str, ...], said: str, learning: tuple[float, float], reading: str,
                when: str, evidence: dict, causes: list[str], remedies: list[Remedy]) -> list[Finding]:
    """The `info` finding of a state `said` beside a loss that still fell to `learning` after it (dead
    units, saturation, a growing gradient): `reading` what that means, `when` its remedy still helps."""
    evidence["loss_since_onset"] = list(learning)
    message = (f"{said}, and the loss still fell {learning[0]:.4g} -> {learning[1]:.4g} after it: {reading}. "
               f"If {when}: {advice.continued(remedies[0].action)}.")
    return [Finding(kind, "info", first, layers, message, evidence, tuple(causes), tuple(remedies))]


def still_falling(run: RunSeries, th: Thresholds) -> bool:
    """The loss of the last window has its median below the 25th percentile of the window before:
    a flat, noisy loss keeps its median near the one before, only a fall carries it past a
    quarter of that window's spread."""
    _, loss = finite_loss(run)
    w = window(len(loss), th.min_loss_window)
    return len(loss) >= 2 * w and float(np.median(loss[-w:])) < float(np.percentile(loss[-2 * w:-w], 25))


def find_loss_plateau(run: RunSeries, th: Thresholds) -> list[Finding]:
    """No learning: the loss at the end is within 1% of where it started. A loss that fell and then
    levelled off has converged, which is not a finding; one that turned non-finite is another."""
    steps, loss = finite_loss(run)
    if len(loss) < th.min_loss_steps or np.isinf(run.loss).any():
        return []
    if stalled := _stalled_on_long_steps(run, th):
        return stalled
    w = window(len(loss), th.min_loss_window)
    # a line search (L-BFGS) steps on the whole batch: its first loss is the start, no noise to take a
    # median over, and its first step often takes most of the fall (a convex fit: 2.35 -> 0.36, then
    # converged, read as flat from a median 0.3575 of its first window)
    first = loss[:1] if advice.Context(run).line_search else loss[:start_window(len(loss), th)]
    start, end = float(np.median(first)), float(np.median(loss[-w:]))
    scale = abs(start)
    change = (start - end) / scale if scale >= 1e-8 else 0.0
    if scale < 1e-8 or change >= th.plateau_improvement:
        return _plateau_since_lr_fell(run, th)
    if change < -th.plateau_worsening and not _noise_on_still_weights(run, first, end - start, th):
        return []
    if _at_floor(first, loss[-w:], th):
        return [_flat_near_zero(int(steps[0]), start, end, w)]
    evidence = {"loss_start": start, "loss_end": end, "improvement": (start - end) / scale, "window_steps": w}
    if _lr_zero_throughout(run):
        return [_plateau_at_lr_zero(int(steps[0]), len(loss), evidence)]
    said = ""
    if from_init(run) and (shrink := weight_shrink(run)) <= th.weight_shrink:  # a higher lr would decay them faster
        evidence["weight_shrink"] = shrink
        causes, remedies = decayed(evidence)
        said = f" The weights shrank to {shrink:.2g} of their first norm."
    elif (low := _lowest(steps, loss, w))[1] <= start - th.rose_back_fall * scale \
            and np.percentile(low[2], 75) < _start_quartile(first):  # (beyond the noise: a dip, not the least of many windows)
        evidence["loss_low"], evidence["loss_low_step"] = low[1], low[0]
        causes, remedies = advice.loss_rose_back(advice.Context(run), evidence)
        message = (f"The loss fell from {start:.4g} to {low[1]:.4g} by step {low[0]}, then rose back to {end:.4g}: "
                   f"the training undid what it had learned. {remedies[0].action}.")
        return [Finding("loss_plateau", "warning", int(steps[0]), (), message, evidence, tuple(causes), tuple(remedies))]
    elif (zero := _zero_gradient_share(run)) >= th.zero_gradient_share:
        evidence["zero_gradient_share"] = zero
        pinned = _pinned_output(run, th)
        causes, remedies = advice.zero_gradient_plateau(pinned)
        said = f" The gradient was exactly 0 in every layer on {zero:.1%} of the steps: no learning rate moves it."
    else:
        causes, remedies = advice.loss_plateau(advice.Context(run), evidence)
    message = (f"The loss has not improved over {len(loss)} steps ({start:.4g} -> {end:.4g}).{said} "
               f"{remedies[0].action}.")
    return [Finding("loss_plateau", "warning", int(steps[0]), (), message, evidence, tuple(causes), tuple(remedies))]


def _zero_gradient_share(run: RunSeries) -> float:
    """The share of the recorded steps whose gradient is exactly 0 in every layer: the loss is flat
    where the model sits (a sigmoid rounded to exactly 0 or 1 before BCELoss, whose log is clamped),
    and a tenfold lr multiplies 0 (a tester's saturated classifier, told to raise it, stayed at 49.86)."""
    total = total_grad_norm(run, stepped_only=True)
    total = total[np.isfinite(total)]
    return float(np.mean(total == 0)) if len(total) else 0.0


def _pinned_output(run: RunSeries, th: Thresholds) -> str | None:
    """The type of the model's last module when it is a saturating activation pinned at its
    asymptotes (`saturated_fraction` of its outputs or more, at the median step): the output's own
    sigmoid, whose loss should be taken on the logits."""
    if not run.layers or "saturated" not in run.metrics:
        return None
    last = max(run.layers, key=lambda l: l.index)
    sat = np.asarray(run.metrics["saturated"][:, run.column(last.name)])
    sat = sat[np.isfinite(sat)]
    pinned = last.type.lower() in advice.SATURATING and len(sat) and np.median(sat) >= th.saturated_fraction
    return last.type if pinned else None


def _start_quartile(first: np.ndarray) -> float:
    """The lower quartile of the start, the bar a dip's upper quartile must pass: of the start's
    window, or of its first half where that is higher, a fall that began inside the window (a tester's
    MLP under OneCycleLR at max_lr 0.6: 2.30 -> 0.36 by step 40 of its window of 40, back to 2.30 by
    the end, its window's quartile 1.20 against the dip's 1.63, told its lr "may be too small")."""
    return float(max(np.percentile(first, 25), np.percentile(first[:max(len(first) // 2, 1)], 25)))


def _lowest(steps: np.ndarray, loss: np.ndarray, w: int) -> tuple[int, float, np.ndarray]:
    """(step, value, the window's losses) of the lowest running median of `w` losses: where the run
    had got to at best. The least of many overlapping windows of a flat, noisy loss is low by chance
    alone (a model learning nothing on per-batch MSE: 10% below its start in 44 of 200 runs), so the
    caller asks its upper quartile to fall below the start's lower quartile too, as `still_falling` does."""
    windows = np.lib.stride_tricks.sliding_window_view(loss, w)
    running = np.median(windows, axis=1)
    i = int(np.argmin(running))
    return int(steps[i + w // 2]), float(running[i]), windows[i]


def first_adaptive_step(run: RunSeries) -> float | None:
    """The median relative update of the weight layers at the run's first step under an adaptive
    optimizer: lr / rms(w) for Adam (its first step is lr·sign(g)), the lr against the weights'
    scale. None elsewhere (SGD, a resumed run, no update measured there, weights starting at 0),
    and under RMSprop, Adagrad or Adadelta, whose first step is no measure of the later ones: RMSprop's
    running average starts at 0 (a first step 10x lr), Adagrad's steps shrink as 1/sqrt(t) (a 1024-wide
    MLP at their usual lrs read 0.55 at the first step, 0.01 at the 50th)."""
    optimizer = advice.Context(run).optimizer
    if not optimizer.startswith(STEP_OF_LR) or not from_init(run) or "update_ratio" not in run.metrics:
        return None
    cols = profile_columns(run)
    if not cols:
        return None
    # under a warm-up (from lr 0: Hugging Face's schedules) the first step is lr·sign(g) at its lr, a
    # fraction of the peak the run goes on at: scaled to it (a tiny BERT at AdamW 3e-2 with 10
    # warm-up steps read 0 at step 0, and its plateau was told to raise the lr tenfold). From the
    # first sampled step with an lr, among the first few, while the weights are still the initial ones
    lr = np.asarray(run.lr, dtype=float)
    peak = float(np.nanmax(lr)) if np.isfinite(lr).any() else float("nan")
    for r in range(min(len(run.steps), FIRST_STEPS)):
        if not (np.isfinite(lr[r]) and lr[r] > 0):
            continue
        u = np.asarray(run.metrics["update_ratio"][r], dtype=float)
        w = np.asarray(run.metrics["weight_norm"][r], dtype=float)
        ratios = [u[c] for c in cols if np.isfinite(u[c]) and np.isfinite(w[c]) and w[c] > 0]
        if ratios:
            return float(np.median(ratios)) * (peak / lr[r] if peak > lr[r] else 1.0)
        if r == 0:
            return None  # (the first step's update unmeasured: no warm-up to look past)
    return None


FIRST_STEPS = 20  # the steps a warm-up's first measured update is looked for in


# Adaptive optimizers whose every step moves a weight by about lr (Adam's m/sqrt(v) is ~1 for a
# steady gradient; Lion's sign step is exactly lr): their first step measures the later ones.
STEP_OF_LR = ("Adam", "NAdam", "RAdam", "Lion")


def _stalled_on_long_steps(run: RunSeries, th: Thresholds) -> list[Finding]:
    """An adaptive optimizer whose first step rewrote at least `adaptive_first_step` of the weights'
    scale, and a loss that has not halved since (`dead_learning`): the steps, set by the lr alone,
    are too long to settle, not too short ("raise the lr" would be the plateau's advice)."""
    ratio = first_adaptive_step(run)
    if ratio is None or ratio < th.adaptive_first_step or loss_fell_to(run, th, th.dead_learning) is not None:
        return []
    steps, loss = finite_loss(run)
    w = window(len(loss), th.min_loss_window)
    start, end = float(np.median(loss[:start_window(len(loss), th)])), float(np.median(loss[-w:]))
    if not start > 0:  # a loss at or below 0 (a GAN's, a negative log-likelihood) has no half to reach
        return []
    ctx = advice.Context(run)
    evidence = {"loss_start": start, "loss_end": end, "improvement": (start - end) / start,
                "window_steps": w, "first_update_ratio": ratio}
    causes = [f"learning rate: {ctx.lr_said} with {ctx.optimizer}, which moves each weight by about lr a step "
              f"whatever the gradient: its first step changed the weights by {ratio:.2g}x their norm (median over layers)"]
    remedies = [ctx.lower_lr(ctx.lr_cut(ratio))]
    message = (f"The loss stalls high ({start:.4g} -> {end:.4g}): each step is too long for the weights' scale "
               f"({ctx.optimizer}'s first one changed them by {ratio:.2g}x their norm). {remedies[0].action}.")
    return [Finding("loss_plateau", "warning", int(steps[0]), (), message, evidence, tuple(causes), tuple(remedies))]


def _plateau_since_lr_fell(run: RunSeries, th: Thresholds) -> list[Finding]:
    """The loss flat since the learning rate fell to `plateau_lr_off` of its peak, for the last
    quarter of the run or more, before it had halved: the schedule ended learning, not the model."""
    keep = np.isfinite(run.loss)
    steps, loss, lr = run.steps[keep], run.loss[keep], run.lr[keep]
    peak = float(np.nanmax(lr)) if np.isfinite(lr).any() else float("nan")
    off = lr <= th.plateau_lr_off * peak
    if not (peak > 0 and off[-1]):
        return []
    k = int(len(off) - np.argmax(~off[::-1])) if (~off).any() else 0  # off from here to the end
    if k == 0 or len(loss) - k < max(th.min_loss_steps, len(loss) / 4):
        return []
    w = window(len(loss) - k, th.min_loss_window)
    start = float(np.median(loss[:start_window(len(loss), th)]))
    at_off, end = float(np.median(loss[k:k + w])), float(np.median(loss[-w:]))
    learnt = start > 0 and end <= 0.5 * start  # annealed to convergence
    if not at_off > 0 or (at_off - end) / at_off >= th.plateau_improvement or learnt \
            or _at_floor(loss[k:k + w], loss[-w:], th) or _flat_before_lr_fell(loss, lr, peak, w, th):
        return []
    evidence = {"loss_start": at_off, "loss_end": end, "improvement": (at_off - end) / at_off, "window_steps": w,
                "lr_peak": peak, "lr_since": float(lr[k]), "loss_run_start": start}
    causes, remedies = advice.lr_schedule_ended(advice.Context(run), int(steps[k]), int(steps[-1]), evidence)
    message = (f"The loss has not improved since step {int(steps[k])} ({at_off:.4g} -> {end:.4g}), when the learning "
               f"rate had fallen to {lr[k]:.3g} ({lr[k] / peak:.1e} of its peak {peak:.3g}). {remedies[0].action}.")
    return [Finding("loss_plateau", "warning", int(steps[k]), (), message, evidence, tuple(causes), tuple(remedies))]


def _lr_zero_throughout(run: RunSeries) -> bool:
    """Every recorded lr is 0. `run.lr` is the first param group's: groups at different lrs (meta
    `lr_scale`, written only when the largest is above 0) mean some group stepped, as a head does
    beside a backbone listed first at lr 0."""
    lr = run.lr[np.isfinite(run.lr)]
    return bool(len(lr)) and not lr.any() and not run.meta.get("lr_scale")


def _plateau_at_lr_zero(step: int, n: int, evidence: dict) -> Finding:
    """A learning rate of 0 on every step so far: nothing moved the weights, so the flat loss says
    nothing about the model, and "raise the lr tenfold" would give 0 again. `info`: a warm start
    (a warm-up from 0, a frozen first phase) looks just like this until its lr rises."""
    message = (f"The loss has not improved over {n} steps ({evidence['loss_start']:.4g} -> {evidence['loss_end']:.4g}), "
               "with the learning rate 0 on every one: no step moved the weights (a warm-up starting at 0, or a "
               "schedule or config at 0).")
    remedy = Remedy("If training should have started, give the optimizer a learning rate above 0",
                    "for group in optimizer.param_groups: group['lr'] = 1e-3  # and check the scheduler's factor at step 0")
    return Finding("loss_plateau", "info", step, (), message, {**evidence, "lr_zero": True},
                   ("learning rate: 0 on every step",), (remedy,))


def _flat_near_zero(step: int, start: float, end: float, w: int) -> Finding:
    """A plateau at the floor, said as `info`: the loss alone cannot tell a converged model (a
    fine-tune at lr 1e-5, 0.0013 -> 0.0015) from a stuck one whose targets are small (y/20 at lr 1e-6,
    0.0013 -> 0.0012); a warning would tell the first to raise its lr."""
    message = (f"The loss is flat near 0 ({start:.3g} -> {end:.3g}): converged, or regression targets on a small scale "
               "that the model is not fitting (standardise them to unit variance to tell).")
    evidence = {"loss_start": start, "loss_end": end, "improvement": (start - end) / start if start else 0.0,
                "window_steps": w, "at_floor": True}
    return Finding("loss_plateau", "info", step, (), message, evidence, (), ())


def _flat_before_lr_fell(loss: np.ndarray, lr: np.ndarray, peak: float, w: int, th: Thresholds) -> bool:
    """The loss flat over the two windows before the lr first fell from its peak: it fell because
    the loss had stopped (ReduceLROnPlateau as documented: flat at lr 0.1 for 48 steps, 1.809 ->
    1.809, then cut), not the other way round. Measured at the lr's first fall, not where it crossed
    `plateau_lr_off`: there a StepLR stepped per batch had gone flat too (2.128 -> 2.125), though
    its loss was falling when its lr first fell, at step 10. After a warm-up, the fall from its peak."""
    top = int(np.argmax(lr >= peak))
    j = top + int(np.argmax(lr[top:] < peak))
    if j < 2 * w:  # too few steps at the peak to tell
        return False
    before, last = float(np.median(loss[j - 2 * w:j - w])), float(np.median(loss[j - w:j]))
    return before > 0 and (before - last) / before < th.plateau_improvement


def _at_floor(first: np.ndarray, last: np.ndarray, th: Thresholds) -> bool:
    """A non-negative loss already near 0 at both ends (`plateau_floor`): a converged model kept
    training (a fine-tune of a fitted net at lr 1e-5), with nothing left to gain by a higher lr."""
    both = np.concatenate([first, last])
    return bool(both.min() >= 0 and max(np.median(first), np.median(last)) <= th.plateau_floor)


def _noise_on_still_weights(run: RunSeries, first: np.ndarray, rise: float, th: Thresholds) -> bool:
    """A loss higher at the end by no more than the spread of its first steps, while the weights
    barely moved (an lr of 1e-6): batch noise, not training making it worse."""
    updates = run.metrics.get("update_ratio")
    if updates is None or not np.isfinite(updates).any():
        return False
    q1, q3 = np.percentile(first, [25, 75])
    return rise <= q3 - q1 and float(np.nanmedian(updates)) < th.plateau_still_update


def _rises_beyond_noise(start: np.ndarray, later: np.ndarray, th: Thresholds) -> bool:
    """The later window's losses rank above the start's beyond chance: a one-sided Mann-Whitney
    test, z from the normal approximation. A median of 20 single-sample losses is itself noisy (a
    squared error is chi-square with 1 degree of freedom): simulated flat runs of 200 such losses
    were flagged in 32.6% of runs on the factor alone, 2.0% with this test too
    (benchmarks/divergence_noise.py)."""
    n1, n2 = len(start), len(later)
    ranks = np.argsort(np.argsort(np.concatenate([start, later]), kind="stable"), kind="stable") + 1.0
    u = ranks[n1:].sum() - n2 * (n2 + 1) / 2
    return (u - n1 * n2 / 2) / np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12) > th.divergence_rank_z


def find_loss_divergence(run: RunSeries, th: Thresholds) -> list[Finding]:
    """Training made the loss worse: the running median rises `divergence_factor` times the initial
    loss's magnitude above it. Each span a new optimizer took over (meta `optimizer_stopped`) is read
    on its own, with its own lr, from where it starts (`_carried_on`): a frozen body's new 10-class
    head, trained by an Adam of its own after the pretraining's SGD, began at 5.1 against the
    pretraining's 0.47 and fell from there (read as 'rises since step 109, lower the lr from 0.05',
    the SGD's)."""
    cuts = optimizer_switches(run)
    if not cuts:
        return _divergence(run, th)
    spans = [run.between(a, b) for a, b in zip([int(run.steps[0]), *cuts], [*cuts, None])]
    found: list[Finding] = []
    for k, span in enumerate(spans):
        if not len(span.steps):
            continue
        found = _divergence(span, th, _carried_on(spans[k - 1], span, th) if k else None)
        if found:
            break
    return found


def _carried_on(before: RunSeries, span: RunSeries, th: Thresholds) -> np.ndarray | None:
    """The last window of losses before a new optimizer's span, when its first loss (taken before
    its first update) is within them: the same objective carried on, and its level is the span's
    start. A window of the span's own held its blow-up (a reviewer's head at Adam lr 20, 0.41 ->
    446, had no finding). None for a span that began elsewhere (a new head's loss, 5.1 after 0.47):
    read from its own first window."""
    _, prior = finite_loss(before)
    _, loss = finite_loss(span)
    if not len(prior) or not len(loss):
        return None
    last = prior[-window(len(prior), th.min_loss_window):]
    return last if loss[0] <= np.percentile(last, 90) else None


def _divergence(run: RunSeries, th: Thresholds, carried: np.ndarray | None = None) -> list[Finding]:
    """`carried`: the losses before the span, whose level it starts from (`_carried_on`)."""
    steps, loss = finite_loss(run)
    w = window(len(loss), th.min_loss_window)
    if len(loss) < 2 * w:
        return []
    start_losses = loss[:start_window(len(loss), th)] if carried is None else carried
    start = float(np.median(start_losses))
    limit = start + th.divergence_factor * max(abs(start), 1e-8)
    # the running median, evaluated every tenth of a window (enough to place the onset)
    ends = np.arange(w - 1, len(loss), max(1, w // 10))
    running = np.median(np.lib.stride_tricks.sliding_window_view(loss, w)[ends - w + 1], axis=1)
    # a blow-up within the first window raises its median with it (a tanh MLP at lr 8: 2.3, 2.5,
    # 66, 297, ... and ~450 on): the first two losses, before updates compound, stand for the start
    # too, with a far higher bar against batch noise
    early = float(loss[:2].max())
    early_limit = early * th.early_divergence_factor if early > 0 else np.inf
    if _refitted_on_a_schedule(loss, limit, th):
        limit = np.inf  # the level follows the targets; only the bar against the first two losses holds
    # the window's losses rank above the start's, at least `divergence_rank_losses` of them from the
    # window's first on: a short run's windows of 5 could never rank beyond chance (z <= 2.6 for 5
    # against 5), and an HF model at lr 3, 4.0 -> 496, ending at 74 after 48 steps, had no finding
    ranked = max(w, th.divergence_rank_losses)
    over = [i for i in np.flatnonzero((running > limit) | (running > early_limit))
            if running[i] > early_limit or _rises_beyond_noise(start_losses, loss[ends[i] - w + 1:ends[i] - w + 1 + ranked], th)]
    if not over:
        return []
    i = ends[over[0]]
    first = int(steps[max(i - w // 2, 0)])  # the median crosses once half the window is above
    if running[over[0]] <= limit:  # found against the first two steps: it starts where the loss leaps
        start, limit = early, early_limit
        first = int(steps[np.flatnonzero(loss > early_limit)[0]])
    evidence = {"loss_start": start, "loss_at_detection": float(running[over[0]]), "loss_max": float(loss.max()),
                "limit": limit, "window_steps": w}
    # (a span's first row is the old optimizer's step, at its lr: the new one's lr is read after it)
    ctx = advice.Context(run.between(int(run.steps[1])) if carried is not None and len(run.steps) > 1 else run)
    causes, remedies = advice.loss_divergence(ctx, evidence)
    message = (f"The loss rises from {start:.4g} to {loss.max():.4g} since step {first}: training is diverging. "
               f"{remedies[0].action}.")
    return [Finding("loss_divergence", "error", first, (), message, evidence, tuple(causes), tuple(remedies))]


def _refitted_on_a_schedule(loss: np.ndarray, limit: float, th: Thresholds) -> bool:
    """The loss leaps `spike_factor`x above the median of the `baseline_window` steps before, at a
    fixed period, and falls back under the divergence limit after each leap: the script re-sets
    the targets it fits on a schedule (a DQN's target network synced every N steps), and the
    loss's level follows them, a sawtooth, not a divergence. A diverging loss does not come back."""
    w = th.baseline_window
    if len(loss) <= 2 * w:
        return False
    before = np.median(np.lib.stride_tricks.sliding_window_view(loss[:-1], w), axis=1)  # row i: loss[i:i+w]
    with np.errstate(invalid="ignore"):
        leaps = np.flatnonzero(loss[w:] > th.spike_factor * np.abs(before)) + w
    if len(leaps) == 0:
        return False
    events = leaps[np.concatenate([[True], np.diff(leaps) > w])]  # the first leap of each run of them
    if not periodic(events, th):
        return False
    ends = [*events[1:], len(loss)]
    if peaks_growing(np.array([loss[a:b].max() for a, b in zip(events, ends)]), th):
        return False  # each leap higher than the last: diverging in steps, 4.4 -> 66
    return all(loss[a + 1:b].size and loss[a + 1:b].min() <= limit for a, b in zip(events, ends))
