"""exploding_gradient: growth over steps, overshooting updates, weights growing without bound,
and a backward signal growing across depth toward the input."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.diagnose.rules.clipping import clipped_advice, clipping
from gradwatch.diagnose.rules.late_clipping import late_first
from gradwatch.diagnose.rules.loss import learning_on
from gradwatch.diagnose.rules.stale_gradients import stale_first
from gradwatch.diagnose.signals import (depth_profile, finite_loss, first_layer_scale, from_init, names, optimizer_switches,
                                        peaks_growing, periodic, persistent_start, plain_sgd, profile_columns, row_nanpercentile,
                                        row_reduce, TOTAL_BLOCK, total_grad_norm, window)
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def find_exploding(run: RunSeries, th: Thresholds) -> list[Finding]:
    backward = _backward_ratios(run)
    signals = [s for s in (_growth_over_steps(run, th), _overshooting_update(run, th), _sgd_step_too_large(run, th),
                           _weight_growth(run, th), _backward_growth(run, backward, th), _clipped_every_step(run, th),
                           _forward_growth(run, th))
               if s is not None]
    if not signals:
        return []
    first = min(step for step, _, _ in signals)
    evidence: dict = {}
    layers: tuple[str, ...] = ()
    for _, found_layers, ev in sorted(signals, key=lambda s: s[0]):
        evidence.update(ev)
        layers = layers or found_layers
    evidence["at_init"] = first == int(run.steps[0]) and from_init(run)
    if (scale := first_layer_scale(run, th.input_scale_std)) is not None:
        evidence["first_layer_std"] = scale
    if "init_forward_growth" not in evidence and (grew := _forward_growth(run, replace(th, **CAUSE_FORWARD_GROWTH))):
        evidence.update(grew[2])  # not a finding of its own: the cause of this one's huge first loss
    if isinstance(run.meta.get("grad_clip"), str) and "clip_said" not in evidence:
        evidence["grad_clip"] = run.meta["grad_clip"]  # a trainer's or the script's: the norms here are taken before it
    rows, ratios, cols = backward  # measured at the first step, before any update: the initial weights
    if from_init(run) and len(cols) >= 2 and len(rows) and run.steps[rows[0]] == run.steps[0] and ratios[0] > th.backward_exploding_ratio:
        evidence["init_backward_ratio"] = float(ratios[0])
    ctx = advice.Context(run)
    causes, remedies = advice.exploding(ctx, layers, evidence, through_time=False)
    if "clip_active_share" in evidence:
        causes, remedies = clipped_advice(ctx, evidence, causes, remedies)
    causes, remedies = stale_first(run, causes, remedies)  # a forgotten zero_grad() grows the sum of gradients
    causes, remedies = late_first(run, causes, remedies)  # the script's clipping, too late to clip
    what = []
    if "growth_over_steps" in evidence:
        if evidence.get("recovered"):
            what.append(f"the gradient norm burst {evidence['bursts']} times to {evidence['growth_over_steps']:.3g}x "
                        "its recent level (the run recovered each time, so far)")
        else:
            what.append(f"the gradient norm rose {evidence['growth_over_steps']:.3g}x above its recent level")
    if "max_update_ratio" in evidence:
        what.append(f"one update changed the weights by {evidence['max_update_ratio']:.3g}x their norm")
    elif "predicted_update_ratio" in evidence:
        what.append(f"a step of lr x the gradient changes the weights by about {evidence['predicted_update_ratio']:.3g}x "
                    "their norm (estimated from the gradient norm and the last sampled weight norm)")
    if "weight_growth" in evidence:
        what.append(f"the weights grew {evidence['weight_growth']:.3g}x")
    if "backward_ratio" in evidence:
        what.append(f"the backward signal grows {evidence['backward_ratio']:.3g}x toward the input")
    if "init_forward_growth" in evidence:
        stds = evidence["init_forward_stds"]
        what.append(f"the activations' std grows {evidence['init_forward_growth']:.3g}x through the layers at the first "
                    f"step ({stds[0]:.3g} -> {stds[-1]:.3g})")
    if "clip_active_share" in evidence:
        what.append(_clipping_said(evidence))
    elif "grad_clip" in evidence:
        what.append(f"these norms are taken before the run clips {evidence['grad_clip']}")
    learning = _learnt_after(run, evidence, first, th)
    if learning is not None:
        said = f"The gradient norm rose {evidence['growth_over_steps']:.3g}x above its recent level from step {first}"
        return learning_on("exploding_gradient", first, layers, said, learning, "learning sped up (a plateau left, new "
                           "data met), no blow-up", "the steps must stay bounded", evidence, causes, remedies)
    if (learning := _outgrown(run, evidence, first, th)) is not None:
        said = f"Gradients overshot the weights at step {first}: " + "; ".join(what)
        return learning_on("exploding_gradient", first, layers, said, learning, "the weights outgrew their small start, "
                           "no blow-up", "the loss stalls", evidence, causes, remedies)
    blow_up = set(evidence) & {"max_update_ratio", "predicted_update_ratio", "weight_growth", "backward_ratio",
                               "init_forward_growth"} \
        or ("growth_over_steps" in evidence and not evidence.get("recovered"))
    verb = "burst" if evidence.get("recovered") else "explode" if blow_up else "are clipped on nearly every step"
    message = f"Gradients {verb} from step {first}: " + "; ".join(what) + f". {remedies[0].action}."
    # recurring bursts the run recovers from, or a norm clipping holds, and nothing else: an
    # instability or a hidden scale, not yet a blow-up
    severity = "error" if blow_up else "warning"
    return [Finding("exploding_gradient", severity, first, layers, message, evidence, tuple(causes), tuple(remedies))]


def _learnt_after(run: RunSeries, evidence: dict, first: int, th: Thresholds) -> tuple[float, float] | None:
    """(loss before the burst, at the end) when the gradient norm's growth is all there is, nothing
    is non-finite, the loss fell to `burst_learning` of its level in the window ending before the
    burst, and no quarter window after it rose above twice that level: a gradient that grows as learning
    speeds up is leaving a plateau; a blow-up makes the loss worse first. A window centred on the
    burst held the loss the blow-up caused (0.33 -> 66 -> 0.66 read as 1.62 -> 0.59). (A test of
    the fall's rate before against after was noise: most healthy losses slow down as they fall.)"""
    others = {"max_update_ratio", "predicted_update_ratio", "weight_growth", "backward_ratio", "clip_active_share"}
    if "growth_over_steps" not in evidence or set(evidence) & others:
        return None
    steps, loss = finite_loss(run)
    if np.isinf(run.loss).any() or len(loss) < th.min_loss_steps:
        return None
    w = window(len(loss), th.min_loss_window)
    i = int(np.searchsorted(steps, first))
    if i < 2 or i + w >= len(loss):
        return None
    level, end = float(np.median(loss[max(i - w, 0):i])), float(np.median(loss[-w:]))
    if not level > 0 or end > th.burst_learning * level:
        return None
    span = min(max(th.min_loss_window, w // 4), len(loss) - i)  # a rise shorter than a window moves no window's median
    risen = np.median(np.lib.stride_tricks.sliding_window_view(loss[i:], span), axis=1).max() > 2 * level
    return None if risen else (level, end)


# Activations growing this much through the layers at the first step make an exploding gradient's
# cause the initial weight scale, not the loss: a ReLU MLP at std 0.5 (He's is 0.25 for 32 inputs)
# grew 1.9x a layer, 1.77 -> 41.8, to a first loss of 1.8e4 on targets of std 2, and was told to
# standardise its targets; re-initialised per activation, it reached 0.116. As a finding of its own
# the bar stays at `forward_layer_growth` (weights with no fan-in scale at all).
CAUSE_FORWARD_GROWTH = {"forward_layer_growth": 1.5, "forward_exploding_ratio": 10.0, "forward_exploding_std": 10.0}


def _outgrown(run: RunSeries, evidence: dict, first: int, th: Thresholds) -> tuple[float, float] | None:
    """(loss up to the overshoot, at the end) when an update larger than the weights is all there
    is, and the loss since fell to `burst_learning` of its level and stayed finite: small weights
    the steps outgrew (their ratio falls as they grow), not a blow-up, which makes the loss worse.
    A logistic regression at SGD lr 2 (update 1.12x its initial weights at step 2, then 0.7x,
    0.18x, 0.07x) trained to 96% and was told to lower its lr 100-fold: 92.8% then. Not where the
    backward signal already grew toward the input at the first step (`init_backward_ratio`): the
    weights were too large, not small (a tester's 16-layer tanh MLP at N(0, 1): its first layer's
    weights 80 -> 117,343 in a step, no gradient reaching it from step 10; its loss fell 15 -> 3)."""
    overshoot = {"max_update_ratio", "predicted_update_ratio"}
    signals = {"growth_over_steps", "weight_growth", "backward_ratio", "init_forward_growth", "clip_active_share",
               "init_backward_ratio"}
    if not set(evidence) & overshoot or set(evidence) & signals:
        return None
    steps, loss = finite_loss(run)
    if np.isinf(run.loss).any() or len(loss) < th.min_loss_steps:
        return None
    # the level is the loss up to the overshoot, before its effect: a window centred on it held the
    # blow-up it made (a reviewer's tanh MLP at SGD lr 10: 1.3, then 29, 22...; read from 12.3 down to
    # 3.25, it was 'outgrown', at 65% where lr 0.3 reaches 100%)
    w = window(len(loss), th.min_loss_window)
    i = int(np.searchsorted(steps, first, side="right"))
    level, end = float(np.median(loss[max(i - w, 0):max(i, 1)])), float(np.median(loss[-w:]))
    return (level, end) if level > 0 and end <= th.burst_learning * level and i + w < len(loss) else None


def _clipped_every_step(run: RunSeries, th: Thresholds):
    """Clipping by norm active on nearly every step, far above its limit: the fixed-length step of
    normalised gradient descent, not a safety net (rules/clipping.py). Not under an adaptive
    optimizer, whose step a common factor on the gradient barely changes (Adam divides it out)."""
    ctx = advice.Context(run)
    clip = None if ctx.adaptive or ctx.line_search else clipping(run, th)
    if clip is None:
        return None
    recorded = np.flatnonzero(np.isfinite(clip.kept))
    if len(recorded) <= 2 * th.warmup_steps:
        return None
    kept = clip.kept[recorded]
    active = kept < 1.0
    if active.mean() < th.clip_active_share or np.median(kept) > th.clip_kept:
        return None
    total = total_grad_norm(run, stepped_only=True)[recorded]
    tenth = max(1, len(total) // 10)
    g = run.metrics["grad_norm"][recorded[0]]
    cols = [c for c in (profile_columns(run) or range(len(run.layers))) if np.isfinite(g[c])]
    top = sorted(sorted(cols, key=lambda c: -g[c])[:3])
    return int(run.steps[recorded[np.argmax(active)]]), names(run, top), {
        "clip_active_share": float(active.mean()), "clip_limit": clip.limit, "clip_said": clip.said,
        "clip_median_norm": float(np.median(total)), "clip_kept": float(np.median(kept)),
        "clip_norm_growth": float(np.median(total[-tenth:]) / np.median(total[:tenth]))}


def _clipping_said(evidence: dict) -> str:
    growth = evidence["clip_norm_growth"]
    grew = f", having grown {growth:.3g}x under it" if growth >= 10 else ""
    return (f"{evidence['clip_said']}, and it was active on {evidence['clip_active_share']:.0%} of the steps, the "
            f"norm before it {evidence['clip_median_norm']:.3g} (median), {1 / evidence['clip_kept']:.3g}x the limit"
            f"{grew}: every update is lr x {evidence['clip_limit']:.3g} long whatever the gradient, so clipping is "
            "not a safety net here but the step rule, and it hides the gradient's scale")


def _growth_over_steps(run: RunSeries, th: Thresholds):
    """The total norm against the median of the previous steps: `spike_steps` spikes of
    `spike_factor` within one baseline window (growth, sustained or in bursts), or one jump of
    `jump_factor`."""
    total = total_grad_norm(run, stepped_only=True)
    finite = np.isfinite(total)
    steps, norms = run.steps[finite], total[finite]
    n, w = len(norms), th.baseline_window
    if n <= 2 * th.warmup_steps:
        return None
    # the warm-up steps never enter the baseline: gradients often start far from their level
    history = np.concatenate([np.full(w, np.nan), norms])
    history[w:w + th.warmup_steps] = np.nan
    history[history == 0] = np.nan  # a zero gradient (a flat batch) says nothing about scale
    windows = np.lib.stride_tricks.sliding_window_view(history, w)[:n]  # row i: norms[i-w:i]
    with np.errstate(divide="ignore", invalid="ignore"):
        base = row_reduce(np.nanmedian, windows)  # (all-NaN rows at the start: NaN)
        # the gradient's own noise as a log-normal spread, one figure for the run: p75/median of a
        # window is exp(0.674 sigma); the calm quarter of the windows, so an explosion filling most
        # of the run does not raise its own bar
        sigma = np.log(row_nanpercentile(windows, 75) / base) / 0.674
        sigma = float(np.nanpercentile(sigma, 25)) if np.isfinite(sigma).any() else 0.0
    bar = max(th.spike_factor, float(np.exp(th.noise_z * max(sigma, 0.0))))
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(base > 0, norms / base, np.nan)
    factor[:2 * th.warmup_steps] = np.nan
    # exploding means large, not only large against a converged, tiny baseline: a spike must also
    # rise above the range the gradient had early in training (the same 99.9th percentile of its
    # early level). Near convergence a cross-entropy's gradient is heavy-tailed: the median falls
    # far below its early level while a few misclassified batches still bring it back there.
    # The early level is the median of the first five windows after warm-up, taken only from the
    # steps before each one: a blow-up within those windows must not raise its own bar.
    early = _early_level(norms, th.warmup_steps, th.early_windows * w)
    early_top = early * float(np.exp(th.noise_z * max(sigma, 0.0)))
    spike = (np.nan_to_num(factor, nan=0.0) >= bar) & (norms >= early_top)
    # spikes within the window ending at each step (steps may have gaps: count by step number)
    count = np.cumsum(spike)
    start = np.searchsorted(steps, steps - w + 1)
    in_window = count - np.concatenate([[0], count])[start]
    # one jump: far above the median and above anything seen for five windows (heavy-tailed
    # per-sample gradients leap from a near-zero median to their usual size often)
    long = th.jump_history_windows * w
    history_long = np.concatenate([np.full(long, np.nan), np.where(np.arange(n) < th.warmup_steps, np.nan, norms)])
    recent_max = row_reduce(np.nanmax, np.lib.stride_tricks.sliding_window_view(history_long, long)[:n])
    jump = ((np.nan_to_num(factor) >= th.jump_factor * bar / th.spike_factor) & (norms >= th.spike_factor * recent_max)
            & (norms >= early_top))
    hit = np.flatnonzero((spike & (in_window >= th.spike_steps)) | jump)
    if len(hit) == 0:
        return None
    # bursts: runs of hits less than a window apart. A burst the run recovers from (the norm back
    # near its old level within a window, nothing non-finite after) is an isolated instability;
    # it is a finding when one burst does not recover, or when they keep coming (chronic).
    bursts = np.split(hit, np.flatnonzero(np.diff(steps[hit]) > w) + 1)
    first_bad = np.flatnonzero(np.isinf(total) | np.isinf(run.loss))  # inf: measured non-finite
    bad_step = run.steps[first_bad[0]] if len(first_bad) else None
    if bad_step is None and _on_a_schedule(bursts, steps, norms, run.lr[finite], th):
        return None
    if bad_step is None:  # a new phase starts its own level; one that ends non-finite blew up
        # (a new optimizer starts a new task even where the same layers train on: a fine-tune's new
        # head at the old one's name; a tester's digits 0-4 -> 5-9 fine-tune was told it exploded 15x)
        changes = np.union1d(_trained_layers_changed(run, th), np.array(optimizer_switches(run), dtype=np.int64))
        ends = np.append(changes[1:], run.steps[-1] + 1)
        starts = np.searchsorted(steps, [c for c, e in zip(changes, ends) if not _leapt_and_stayed(run, c, e, bar, th)])
        bursts = [b for b in bursts if not ((b[0] >= starts) & (b[0] - starts <= th.warmup_steps)).any()]
    if not bursts:
        return None
    unrecovered = None
    for burst in bursts:
        i = burst[0]
        j = i if jump[i] and in_window[i] < th.spike_steps else start[i] + np.argmax(spike[start[i]:i + 1])
        after = norms[burst[-1] + 1:burst[-1] + 1 + w]
        recovered = len(after) == w and after.min() < th.recovered_factor * base[j] and (bad_step is None or bad_step < steps[i])
        if not recovered:
            unrecovered = i
            break
    if unrecovered is None and (len(bursts) < th.chronic_bursts or _within_early_range(bursts, norms, early_top, th)):
        return None
    first = bursts[0][0]
    i = first if unrecovered is None else unrecovered
    j = start[first] + np.argmax(spike[start[first]:first + 1]) if spike[first] else first
    g = run.metrics["grad_norm"][run.steps.searchsorted(steps[j])]
    cols = profile_columns(run) or list(range(len(run.layers)))
    top = sorted(sorted((c for c in cols if np.isfinite(g[c])), key=lambda c: -g[c])[:3])  # the largest 3, input first
    level, grown = _before_burst(norms, j, w, th)
    return int(steps[j]), names(run, top), {
        # (grown from the warm-up on: the recent level was the blow-up's, the warm-up's is the healthy one)
        "growth_over_steps": float(factor[i]), "baseline_norm": _clip_level(level, base[i]) if grown else float(base[i]),
        "spike_bar": bar,
        "grad_norm_at_detection": float(norms[i]), "detected_at_step": int(steps[i]), "bursts": len(bursts),
        # the level to clip at: the top of the early norms before the burst (the median would
        # clip most batches of a heavy-tailed, batch-size-1 run; the burst itself is no level)
        "early_norm": _clip_level(level, early[j]),
        "recovered": unrecovered is None}


def _trained_layers_changed(run: RunSeries, th: Thresholds) -> np.ndarray:
    """Steps where the set of weight layers that get a gradient changed for good: each side held for
    `baseline_window` recorded steps or more (the side after, or up to the last step: a live check
    right after the switch). A backbone frozen (requires_grad_(False)) for a fine-tune on new data,
    a layer unfrozen: the total norm then sums other layers over another loss, and its level before
    says nothing of its level after (a net pretrained on 5 digit classes and fine-tuned, first half
    frozen, on all 10: 0.4 -> 12 at the first step, loss 0.06 -> 9.4, then falling, was told it
    exploded)."""
    g, cols, n, w = run.metrics.get("grad_norm"), run.weight_columns(), len(run.steps), th.baseline_window
    rows, where = [], []  # (row, column) of every switch between a gradient and none, a block at a time
    before = None
    for a in range(0, n, TOTAL_BLOCK):
        got = ~np.isnan(np.asarray(g[a:a + TOTAL_BLOCK, cols]))  # inf is a gradient too (a blow-up), NaN none
        flips = np.diff(got, axis=0, prepend=got[:1] if before is None else before[None])
        r, c = np.nonzero(flips)
        rows.append(r + a)
        where.append(c)
        before = got[-1]
    rows, where = np.concatenate(rows), np.concatenate(where)
    changes: set[int] = set()
    for c in np.unique(where):
        edges = np.sort(rows[where == c])
        bounds = np.concatenate([[0], edges, [n]])
        for k, e in enumerate(edges):  # a switch at e: the run before it long, the one after too or still on
            if bounds[k + 1] - bounds[k] >= w and (bounds[k + 2] - bounds[k + 1] >= w or bounds[k + 2] == n):
                changes.add(int(run.steps[e]))
    return np.array(sorted(changes), dtype=np.int64)


def _leapt_and_stayed(run: RunSeries, change: int, end: int, bar: float, th: Thresholds) -> bool:
    """Whether the layers trained on both sides of a change in the trained set leapt by `bar` over
    the window after it and stayed `bar` up through the phase's last window (up to `end`): then the
    blow-up is in the layers that were already learning, not the new sum (gradual unfreezing that
    blew up at each step, 1 -> 210 -> 3e4 -> 4e6). A head fine-tuned on new data leaps too, then
    settles (0.3 -> 12 -> 0.5): a new phase's level, no explosion. So does a backbone whose
    pretraining had converged (loss 0.001) once a new head and task start it again: its gradients
    stay well above the converged level while the new loss falls (0.69 -> 0.03, a tester's digits
    fine-tune told it exploded 641x). A phase whose loss fell to `burst_learning` of its level after
    the switch is learning, however high its gradients stayed. A phase under two windows long (a
    live check right after the switch) is given the benefit of the doubt until a later check."""
    g, w = run.metrics["grad_norm"], th.baseline_window
    cols = np.array(run.weight_columns())
    a, b, e = np.searchsorted(run.steps, [change, change, end])
    before, after, last = (np.asarray(g[r0:r1][:, cols]) for r0, r1 in ((max(a - w, 0), a), (b, b + w), (max(e - w, b), e)))
    common = np.isfinite(before).all(axis=0) & np.isfinite(after).all(axis=0) & np.isfinite(last).all(axis=0)
    if not common.any() or not len(before) or e - b < 2 * w:  # too soon to tell it stayed (a live check)
        return False
    start_loss, end_loss = (run.loss[r0:r1][np.isfinite(run.loss[r0:r1])] for r0, r1 in ((b, b + w), (max(e - w, b), e)))
    if len(start_loss) and len(end_loss) and 0 < np.median(end_loss) <= th.burst_learning * np.median(start_loss):
        return False
    level = np.median(np.linalg.norm(before[:, common], axis=1))
    return bool(np.linalg.norm(after[:, common], axis=1).max() >= bar * level
                and np.median(np.linalg.norm(last[:, common], axis=1)) >= bar * level)


def _within_early_range(bursts: list[np.ndarray], norms: np.ndarray, early_top: np.ndarray, th: Thresholds) -> bool:
    """Recovered bursts none of which rose above the early range of the norm (after warm-up, before
    the first burst): the heavy tail of the gradient, not an instability, which carries the norm
    past anything it had when the net was fresh. At batch size 1 a cross-entropy's norm is ~0 on
    most samples and large on the few misclassified: bursts 3000x its median that stayed under
    0.7x its early peak (oscillating, SGD lr 0.01, 2-50-3 MLP) were called chronic. The range is
    taken once the norm has settled (first under `early_top`), so the decay from a large initial
    gradient does not set it: a norm 536 at step 5 (loss 50 at init) hid six bursts 301x its level,
    the loss leaping 20x with each. Its max, not a percentile: that 2-50-3 MLP's early peak was one
    sample, 79, and the next 27, with bursts to 50."""
    stop = min(th.warmup_steps + th.early_windows * th.baseline_window, bursts[0][0])
    early = norms[th.warmup_steps:stop]
    settled = np.flatnonzero(early <= early_top[stop - 1]) if len(early) else []
    if len(settled) == 0:
        return False
    return max(norms[b].max() for b in bursts) <= early[settled[0]:].max()


def _on_a_schedule(bursts: list[np.ndarray], steps: np.ndarray, norms: np.ndarray, lr: np.ndarray, th: Thresholds) -> bool:
    """Bursts at a fixed period, each subsiding a decade (`spike_factor`) below its peak before the
    next, their peaks not growing, and the lr not raised at them: the script re-sets what the model
    fits on a schedule (a target network synced), and the gradient follows. Recurring bursts of an
    instability neither keep time nor settle back each time; warm restarts of the lr that blow up
    keep time, but the blow-up is the lr's doing, a finding."""
    if not periodic(steps[[b[0] for b in bursts]], th):
        return False
    peaks = np.array([norms[b].max() for b in bursts])
    growing = peaks_growing(peaks, th) and peaks_growing(_over_level_before(bursts, norms, peaks), th)
    if growing or any(_lr_raised(lr, b[0], th) for b in bursts):
        return False
    ends = [b[0] for b in bursts[1:]] + [len(norms)]
    return all(norms[b[-1] + 1:end].size and norms[b[-1] + 1:end].min() * th.spike_factor < peak
               for b, end, peak in zip(bursts, ends, peaks))


def _over_level_before(bursts: list[np.ndarray], norms: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Each burst's peak over the level the norm settled to between it and the burst before (its
    10th percentile there, below the last burst's tail; NaN-free): a DQN whose Q-values grow 10x
    over the run grows its settled norm with them, each sync's burst still ~300x that level, and its
    absolute peaks read as growing."""
    starts, after = [b[0] for b in bursts], [0] + [b[-1] + 1 for b in bursts[:-1]]
    levels = np.array([np.percentile(norms[a:i], 10) if i > a else np.nan for a, i in zip(after, starts)])
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = peaks / levels
    return relative[np.isfinite(relative)]


def _lr_raised(lr: np.ndarray, i: int, th: Thresholds) -> bool:
    """The lr at step i (or the step before) over 2x its lowest in the window before: a restart or
    a warm-up, not the targets, moved the gradient (a cosine restart lifts it 10-1000x)."""
    before, at = lr[max(i - th.baseline_window, 0):max(i - 1, 0)], lr[max(i - 1, 0):i + 1]
    if not (np.isfinite(before).any() and np.isfinite(at).any()):  # not recorded: nothing to say
        return False
    return bool(np.nanmax(at) > 2 * np.nanmin(before))


def _early_level(norms: np.ndarray, skip: int, length: int) -> np.ndarray:
    """Per step i, the median of norms[skip:min(skip + length, i)] (NaN before any): the
    gradient's early level as far as it was known at step i."""
    level = np.full(len(norms), np.nan)
    stop = min(skip + length, len(norms))
    for i in range(skip + 1, stop):
        level[i] = np.median(norms[skip:i])
    if stop > skip:
        level[stop:] = np.median(norms[skip:stop])
    return level


def _before_burst(norms: np.ndarray, j: int, w: int, th: Thresholds) -> tuple[np.ndarray, bool]:
    """The norms the clip level is read from: those after the warm-up steps and before the burst at
    `j`; for a burst that began within a few steps of the warm-up's end, the warm-up's own, the only
    ones before it (a tester's LSTM at SGD lr 1: 0.33 at step 0, 82 at step 5, 3e7 at step 7, told
    to clip at 9.3e7, read from steps 5-9); and whether the growth began in the warm-up."""
    after = norms[th.warmup_steps:min(th.warmup_steps + th.early_windows * w, j)]
    warm = norms[:max(min(j, th.warmup_steps), 1)]
    warm = warm[np.isfinite(warm) & (warm > 0)]
    if len(after) < th.persist_samples:
        return warm, False
    # already ten times the warm-up's level: the growth began before the burst was told (steps 5-9
    # of that LSTM, 82 -> 3.6e7, were read as its level)
    finite = after[np.isfinite(after)]
    grown = bool(len(warm) and len(finite) and np.median(finite) > 10 * np.median(warm))
    return (warm, True) if grown else (after, False)


def _clip_level(early_norms: np.ndarray, fallback: float) -> float:
    positive = early_norms[early_norms > 0]
    return float(np.percentile(positive, 90)) if len(positive) else fallback


def _sgd_step_too_large(run: RunSeries, th: Thresholds):
    """Under plain SGD the update is lr·g, so every step's relative update is known from the
    gradient norm and the last sampled weight norm, long before the next sample. Where the
    sampled updates show the step is not lr·g (clipping in the script, a wrapper), it is not used.
    With momentum the step is lr times a running sum of gradients, which the norms do not give.
    Read TOTAL_BLOCK rows at a time: whole, its steps x layers tables took 0.8 GB at 50k x 480."""
    if not plain_sgd(run):
        return None
    g, w, u = run.metrics.get("grad_norm"), run.metrics.get("weight_norm"), run.metrics.get("update_ratio")
    if g is None or w is None:
        return None
    cols = _from_nonzero_weights(run, w)
    if not cols:
        return None
    last = np.full(len(cols), np.nan)  # each layer's last sampled weight norm, carried forward
    first = np.full(len(cols), np.nan)  # and its first (`_shrunk`)
    found = None
    for a in range(0, len(run.steps), TOTAL_BLOCK):
        wb = np.asarray(w[a:a + TOTAL_BLOCK, cols])
        sampled, finite = ~np.isnan(wb), np.isfinite(wb)
        first = np.where(np.isnan(first) & finite.any(axis=0), wb[finite.argmax(axis=0), np.arange(len(cols))], first)
        at = np.maximum.accumulate(np.where(sampled, np.arange(len(wb))[:, None], -1), axis=0)
        wb = np.where(at >= 0, wb[np.maximum(at, 0), np.arange(len(cols))], last)
        last = wb[-1]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lr = run.lr[a:a + TOTAL_BLOCK, None]
            predicted = np.where((wb > 0) & np.isfinite(wb), lr * np.asarray(g[a:a + TOTAL_BLOCK, cols]) / wb, np.nan)
            if u is not None:  # calibrate on the samples where the prediction was large enough to tell
                measured = np.asarray(u[a:a + TOTAL_BLOCK, cols])
                check = sampled & np.isfinite(measured) & np.isfinite(predicted) & (predicted > 0.1 * th.max_update_ratio)
                if (measured[check] < 0.5 * predicted[check]).any():
                    return None
            big = np.isfinite(predicted) & (predicted > th.max_update_ratio) & ~(wb <= th.weight_shrink * first)
        rows = np.flatnonzero(big.any(axis=1))
        if found is None and len(rows):
            r = rows[0]
            found = (int(run.steps[a + r]), names(run, [c for c, b in zip(cols, big[r]) if b]),
                     {"predicted_update_ratio": float(np.nanmax(predicted[r][big[r]]))})
    return found


def _overshooting_update(run: RunSeries, th: Thresholds):
    """An update larger than the weights. Only where the step follows the gradient's size (SGD,
    hand-written updates): an adaptive optimizer's step is set by its learning rate, not by the
    gradient, so an overshoot there is a learning-rate problem, not an exploding gradient. Nor
    where a quasi-Newton optimizer (L-BFGS) sets the step's length itself (advice.LINE_SEARCH)."""
    ctx = advice.Context(run)
    if ctx.adaptive or ctx.line_search:
        return None
    u, w = run.metrics.get("update_ratio"), run.metrics.get("weight_norm")
    if u is None or w is None:
        return None
    cols = _from_nonzero_weights(run, w)
    if not cols:
        return None
    big = (u[:, cols] > th.max_update_ratio) & np.isfinite(u[:, cols]) & (w[:, cols] > 0) & np.isfinite(w[:, cols])
    return _first_overshoot(run, cols, u[:, cols], big & ~_shrunk(w[:, cols], th))


def _shrunk(w: np.ndarray, th: Thresholds) -> np.ndarray:
    """Per row and column of `w` (weight norms, NaN unsampled), whether the layer's weights are at
    `weight_shrink` of their first sampled norm or less: an update ratio against them measures the
    decay's work (weight decay settling the weights where λ‖w‖ ≈ ‖g‖), not a step too long."""
    first = np.full(w.shape[1], np.nan)
    for c in range(w.shape[1]):
        rows = np.flatnonzero(np.isfinite(w[:, c]))
        if len(rows):
            first[c] = w[rows[0], c]
    with np.errstate(invalid="ignore"):
        return w <= th.weight_shrink * first


def _from_nonzero_weights(run: RunSeries, w: np.ndarray) -> list[int]:
    """The profile's layers, but those whose weights were all 0 at their first sample: the norm an
    update is measured against is then their own few updates (or a bias wandering near 0), not a
    weight scale, and a ratio above 1 says nothing (an all-zero tanh MLP's output layer: 1.3 at step
    54, its weights kept at 0 by the zero activations below; a zero-initialised head reads ~1 early
    on by design). The zero init itself is what diagnose names for them."""
    cols = profile_columns(run)
    first = [np.flatnonzero(np.isfinite(w[:, c])) for c in cols]
    return [c for c, rows in zip(cols, first) if not (len(rows) and w[rows[0], c] == 0)]


def _first_overshoot(run: RunSeries, cols: list[int], ratios: np.ndarray, big: np.ndarray):
    """The first step where some layer's update ratio (rows x `cols`) is `big`: that step, those
    layers, and the largest ratio among them."""
    rows = np.flatnonzero(big.any(axis=1))
    if len(rows) == 0:
        return None
    r = rows[0]
    hit = [c for c, b in zip(cols, big[r]) if b]
    return int(run.steps[r]), names(run, hit), {"max_update_ratio": float(np.nanmax(ratios[r][big[r]]))}


def _weight_growth(run: RunSeries, th: Thresholds):
    w = run.metrics.get("weight_norm")
    cols = profile_columns(run)
    if w is None or not cols:
        return None
    rows = np.flatnonzero(np.isfinite(w[:, cols]).all(axis=1))
    if len(rows) < th.persist_samples + 1:
        return None
    total = np.sqrt(np.square(w[rows][:, cols]).sum(axis=1))
    if not total[0] > 0:  # all-zero initial weights: growth from nothing is not a ratio
        return None
    growth = total / total[0]
    rising = np.all(np.diff(total[-(th.persist_samples + 1):]) > 0)
    if not (rising and growth[-1] >= th.weight_growth and _not_slowing(run.steps[rows], np.log(growth), th)):
        return None
    r = rows[np.flatnonzero(growth >= th.weight_growth)[0]]
    per_layer = w[rows[-1], cols] / w[rows[0], cols]
    top = sorted(cols[i] for i in np.argsort(-per_layer)[:3])
    return int(run.steps[r]), names(run, top), {"weight_growth": float(growth[-1])}


def _not_slowing(steps: np.ndarray, log_growth: np.ndarray, th: Thresholds) -> bool:
    """Weights growing without bound keep their pace: the log of their norm rises in the second half
    of the run at least `weight_growth_pace` times as much as in the first (a geometric blow-up
    rises alike in both). Healthy training slows down: weights leave a small initialisation fast,
    then grow like sqrt(t) (a random walk) or log(t) (cross-entropy on separable data, Soudry et
    al. 2018); a tester's healthy 100k-step run had grown 13.4x."""
    mid = np.searchsorted(steps, (steps[0] + steps[-1]) / 2)
    first, second = log_growth[mid] - log_growth[0], log_growth[-1] - log_growth[mid]
    return bool(second >= th.weight_growth_pace * first)


def _backward_ratios(run: RunSeries) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(sampled rows, ∂L/∂(output) RMS of the lowest hidden layer over the highest's, columns):
    growth toward the input; NaN where the highest got none."""
    rows, values, cols = depth_profile(run, "grad_out_rms", hidden_only=True)
    while len(cols) >= 2 and len(rows) and _off_the_chain(run, rows, values[:, -2:], cols[-1]):
        values, cols = values[:, :-1], cols[:-1]
    if len(cols) < 2 or len(rows) == 0:
        return rows, np.full(len(rows), np.nan), cols
    with np.errstate(divide="ignore", invalid="ignore"):
        return rows, np.where(values[:, -1] > 0, values[:, 0] / values[:, -1], np.nan), cols


def _off_the_chain(run: RunSeries, rows: np.ndarray, pair: np.ndarray, top: int) -> bool:
    """The layer `top` is not the only one the layer below feeds (a policy head beside a value
    head): the gradient below it is larger than one layer can make it. Through a layer y = xWᵀ the
    backward is G_x = G_y W, so ‖G_x‖ ≤ ‖W‖·‖G_y‖ and, as RMS, rms_x / rms_y ≤ ‖W‖_F·√(n_out/n_in)
    ≤ ‖W‖_F·√n_params; times an activation's slope (SELU's at most 1.76: 2 allowed). A median ratio
    beyond that at the sampled steps is a sibling's gradient, not growth (an actor-critic whose
    deterministic policy head got 4e-7: "grows 1.1e7x toward the input", 17x through its body)."""
    w = run.metrics.get("weight_norm")
    if w is None:
        return False
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = pair[:, 0] / pair[:, 1]
    ratios, norms = ratios[np.isfinite(ratios)], np.asarray(w[rows, top], dtype=float)
    norms = norms[np.isfinite(norms)]
    if not len(ratios) or not len(norms):
        return False
    return bool(np.median(ratios) > 2.0 * np.median(norms) * math.sqrt(max(run.layers[top].n_params, 1)))


def _forward_growth(run: RunSeries, th: Thresholds):
    """The activations' std at the first step, before any update, layer after layer in forward order:
    growing `forward_layer_growth`x per layer or more (geometric mean), `forward_exploding_ratio`x in
    all, to `forward_exploding_std` or more. The initial weights' scale, whatever the optimizer (under
    Adam no update or gradient ratio shows it)."""
    std = run.metrics.get("act_std")
    if std is None or not from_init(run) or not len(run.steps):
        return None
    acts = sorted((c for c, l in enumerate(run.layers) if l.role == "activation"), key=lambda c: run.layers[c].index)
    first = np.asarray(std[0], dtype=float)
    cols = [c for c in acts if np.isfinite(first[c]) and first[c] > 0]
    if len(cols) < 3:
        return None
    stds = first[cols]
    growth = float(stds[-1] / stds[0])
    per_layer = growth ** (1.0 / (len(cols) - 1))
    if growth < th.forward_exploding_ratio or per_layer < th.forward_layer_growth or stds[-1] < th.forward_exploding_std:
        return None
    return int(run.steps[0]), names(run, cols[1:]), {"init_forward_growth": growth,
                                                      "init_forward_stds": [float(s) for s in stds]}


def _backward_growth(run: RunSeries, backward: tuple[np.ndarray, np.ndarray, list[int]], th: Thresholds):
    rows, ratios, cols = backward
    if len(cols) < th.min_profile_layers or len(rows) == 0:
        return None
    start = persistent_start(ratios > th.backward_exploding_ratio, th.persist_samples)
    if start is None:
        return None
    return int(run.steps[rows[start]]), names(run, cols[:2]), {
        "backward_ratio": float(np.nanmedian(ratios[start:]))}
