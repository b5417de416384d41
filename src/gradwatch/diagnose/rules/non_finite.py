"""non_finite: the first step, and the first layer, where a NaN or Inf appears.

In the store a measured NaN is +inf and NaN means "not recorded", so any infinite value is a
non-finite measurement. Steps a GradScaler skipped are not steps, so they never count here, unless
it skipped every iteration to the end, or most (`find_scaler_stuck`).
"""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.diagnose.signals import from_init, skipped_after_last, total_grad_norm
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import LayerInfo, RunSeries

SOURCES = (("loss", None), ("activations", ("act_mean", "act_std")), ("gradients", ("grad_norm", "grad_max")),
           ("weights", ("weight_norm",)))


def find_non_finite(run: RunSeries, th: Thresholds) -> list[Finding]:
    in_run = _in_the_run(run)
    found = _on_one_rank(run, in_run[0] if in_run else None) or in_run
    return found or find_scaler_stuck(run, th)


def find_scaler_stuck(run: RunSeries, th: Thresholds) -> list[Finding]:
    """A GradScaler that skipped every iteration from the last stored step to the end, at least
    `scaler_stuck_skips` of them (it halves its scale at each: after 20 the values are NaN/Inf at
    1e-6 of the scale and more), or that many and at least half of all the iterations, batch by
    batch: no scaled gradient's overflow but the forward's or the loss's own, and nothing (or
    little) trained. A tester's float16 attention model stored 31 steps of 150, the other 119
    skipped (81 in a row to the end), and had no finding: skipped steps are events, never steps."""
    last = int(run.steps[-1]) if len(run.steps) else -1
    first = int(run.steps[0]) if len(run.steps) else 0
    mine = [int(s) for s in run.meta.get("skipped_steps") or () if first <= s <= last + 1]  # (this phase's)
    tail = skipped_after_last(run)
    if tail >= th.scaler_stuck_skips:
        step = last + 1
        what = (f"From step {step} on, a GradScaler skipped every iteration to the end ({tail} in a row): the loss "
                f"or its gradients were NaN/Inf at any scale, so nothing trained" + (f" after step {last}" if last >= 0 else ""))
    elif len(mine) >= th.scaler_stuck_skips and len(mine) >= len(run.steps):
        step = mine[0]
        what = (f"A GradScaler skipped {len(mine)} of {len(mine) + len(run.steps)} iterations (from step {step}): "
                "the loss or its gradients were NaN/Inf on most batches at any scale, so those trained nothing")
    else:
        return []
    evidence = {"step": step, "scaler_skipped": len(mine), "scaler_skipped_to_end": tail, "first_seen_in": "loss scaler",
                "at_init": False, "grad_growth_before": float("nan")}
    causes = [f"a NaN/Inf in the forward or the loss that no loss scale removes (the scaler halves its scale at each "
              f"skip): in float16, a value past 65504 (attention scores without the 1/sqrt(d) scale, an exp, "
              f"activations growing through depth); in any precision, a log(0), 0/0 or a NaN in the batch"]
    remedies = [Remedy(f"Find the operation: {advice._fix_command(advice.Context(run))} runs the script again and "
                       "names the first operation that makes a NaN/Inf", ""),
                Remedy("Under float16 autocast, compute in bfloat16 (float32's range), or keep that operation in float32",
                       "with torch.autocast(device_type, dtype=torch.bfloat16):  # no GradScaler needed\n"
                       "    loss = loss_fn(model(x), y)")]
    return [Finding("non_finite", "error", step, (), f"{what}. {remedies[0].action}.", evidence, tuple(causes),
                    tuple(remedies))]


def _on_one_rank(run: RunSeries, seen: Finding | None) -> list[Finding]:
    """Under DDP/FSDP, one rank's own loss went non-finite while the others' stayed finite: a bad
    batch or input on that rank (the synchronised gradients then carry it to every rank). The
    same NaN seen in the stored run at that step is this finding, told once, with its evidence."""
    events = run.meta.get("rank_non_finite") or []
    if not events:
        return []
    step, detail = events[0]
    same = seen is not None and seen.first_step == int(step)
    evidence = {**(seen.evidence if same else {"at_init": False, "grad_growth_before": float("nan")}),
                "step": int(step), "rank_events": [f"step {s}: {d}" for s, d in events]}
    layers = seen.layers if same else ()
    causes, remedies = advice.non_finite(advice.Context(run), layers, evidence)
    message = (f"At step {step} {detail} while the other ranks' losses were finite: that rank's data or "
               f"its computation produced it. {remedies[0].action}.")
    found = [Finding("non_finite", "error", int(step), layers, message, evidence, tuple(causes), tuple(remedies))]
    return found if same or seen is None else [seen, *found]


def _in_the_run(run: RunSeries) -> list[Finding]:
    where: dict[str, tuple[int, tuple[str, ...]]] = {}
    bad_steps: set[int] = set()
    for source, metrics in SOURCES:
        if metrics is None:
            rows = np.flatnonzero(np.isinf(run.loss))
            bad_steps.update(run.steps[rows].tolist())
            if len(rows):
                where[source] = (rows[0], ())
            continue
        bad = np.zeros((len(run.steps), len(run.layers)), dtype=bool)
        for m in metrics:
            if m in run.metrics:
                bad |= np.isinf(run.metrics[m])
        if "nonfinite" in run.metrics and source == "gradients":
            bad |= np.nan_to_num(run.metrics["nonfinite"], nan=0.0) > 0
        if source == "weights" and bad.any():  # (read only then: the live rules run this at every check)
            bad &= ~_overflowed(run, bad)
        rows = np.flatnonzero(bad.any(axis=1))
        bad_steps.update(run.steps[rows].tolist())
        if len(rows):
            r = rows[0]
            cols = sorted(np.flatnonzero(bad[r]), key=lambda c: run.layers[c].index)
            where[source] = (r, tuple(run.layers[c].name for c in cols))
    if not where:
        return []
    first_row = min(r for r, _ in where.values())
    at_first = {s: layers for s, (r, layers) in where.items() if r == first_row}
    step = int(run.steps[first_row])
    # forward order: an activation is the origin if it went first, else the lowest layer hit
    origin = next((s for s, _ in SOURCES if s in at_first), "gradients")
    layers = at_first.get(origin, ()) or next((l for l in at_first.values() if l), ())
    fed = _fed_by(run, layers, at_first.get("activations", ()), at_first.get("gradients", ()))
    if fed:
        layers = (fed.name, *layers)
    loaded = _weights_at_start(run) if first_row == 0 else ()
    if loaded:  # the weights were so before any update: everything else computed from them follows
        origin = "weights"
        hit = {l for ls in at_first.values() for l in ls} | set(loaded)
        layers = (*loaded, *sorted(hit - set(loaded), key=lambda n: run.layers[run.column(n)].index))
    total = total_grad_norm(run)[:first_row]
    finite = total[np.isfinite(total)]
    # the last norm against the level before the burst; a run that blew up within 10 steps has
    # no such level, and its first step stands for it
    before = np.median(finite[-20:-5]) if len(finite) >= 10 else (finite[0] if len(finite) >= 2 else np.nan)
    growth = float(finite[-1] / before) if before > 0 else float("nan")
    evidence = {"step": step, "first_seen_in": origin, "sources": sorted(at_first),
                "layers_hit": len(layers), "at_init": first_row == 0 and from_init(run), "grad_growth_before": growth}
    if loaded:
        evidence["nonfinite_weights_at_start"] = list(loaded)
    if "nonfinite" in run.metrics:
        evidence["nonfinite_entries"] = int(np.nansum(run.metrics["nonfinite"][first_row]))
    finite_loss = run.loss[:first_row][np.isfinite(run.loss[:first_row])]
    if len(finite_loss):
        evidence["last_finite_loss"] = float(finite_loss[-1])
    skipped = set(run.meta.get("guard_skipped_steps") or ())  # weights NaN from the start: no skip undoes that
    guarded = sorted(bad_steps) if bad_steps <= skipped and not loaded else None
    if guarded:  # gw.guard kept every one from the weights: the run went on, the cause is still there
        evidence["guard_skipped_steps"] = guarded
    ctx = advice.Context(run)
    causes, remedies = advice.non_finite(ctx, layers, evidence)
    place = (f"the input of '{layers[1]}': the output of '{fed.name}', or an operation on it between the two" if fed else
             f"the {origin} in '{layers[0]}'" if at_first.get(origin) else
             f"the {origin} (the first layer hit: '{layers[0]}')" if layers else f"the {origin}")
    if guarded:
        message = (f"NaN/Inf appeared in {place} at step {advice.listed(guarded, 5, quote=False)}; gw.guard skipped "
                   f"{'that step' if len(guarded) == 1 else 'those steps'}, so the weights never took them. "
                   f"{remedies[0].action}.")
        return [Finding("non_finite", "warning", step, layers, message, evidence, tuple(causes), tuple(remedies))]
    if loaded:
        message = (f"The weights of {advice.listed(loaded)} hold NaN/Inf at step {step}, the first recorded, before any "
                   f"update: the initialisation or a loaded checkpoint put it there, and every step computed from "
                   f"them is meaningless. {remedies[0].action}.")
        return [Finding("non_finite", "error", step, layers, message, evidence, tuple(causes), tuple(remedies))]
    message = (f"NaN/Inf first appears at step {step} in {place}; every step after it is "
               f"meaningless. {remedies[0].action}.")
    return [Finding("non_finite", "error", step, layers, message, evidence, tuple(causes), tuple(remedies))]


def _fed_by(run: RunSeries, layers: tuple[str, ...], acts: tuple[str, ...], grads: tuple[str, ...]) -> LayerInfo | None:
    """A standard activation (ReLU, tanh, ...) maps finite inputs to finite outputs, so when the
    lowest one hit is the first named, the NaN was already in its input: the output of the layer
    that ran just before it (a NaN in the batch reaches the first Linear, whose output is not
    measured, then its ReLU) or an operation the forward ran on that output (`act(sqrt(fc(x)))`),
    when that layer's own gradients went non-finite at that step too."""
    if not layers or not acts or layers[0] != acts[0]:
        return None
    act = run.layers[run.column(acts[0])]
    before = next((l for l in run.layers if l.index == act.index - 1), None)
    if act.role != "activation" or not act.activation or before is None or before.name not in grads:
        return None
    return before


def _weights_at_start(run: RunSeries) -> tuple[str, ...]:
    """Layers, in forward order, whose weight norm is non-finite at the first recorded step. The norm
    is read before that step's update (a layer whose gradient was already Inf there still has a
    finite weight), so no learning rate put it there: the initialisation or a loaded checkpoint did."""
    w = run.metrics.get("weight_norm")
    if w is None or len(run.steps) == 0:
        return ()
    cols = sorted(np.flatnonzero(np.isinf(np.asarray(w[:1], dtype=float))[0]), key=lambda c: run.layers[c].index)
    return tuple(run.layers[c].name for c in cols)


def _overflowed(run: RunSeries, inf: np.ndarray) -> np.ndarray:
    """Of the infinite weight norms `inf` (steps x layers), those that are the norm overflowing
    float32, not a NaN or Inf in the weights: torch's sum of squares overflows for entries past
    ~1.8e19 (a tester's DDP blow-up: layer '2' at 4.6 then inf ten steps later, '0' at 5.6e14
    there, the loss finite at 7.7e22: "NaN/Inf first appears in the weights"). So: the step's loss
    measured finite (its forward used finite weights) and the run blowing up around it, by the
    loss, another layer's norm or this one's last (`OVERFLOW_NEAR`). A checkpoint's NaN row that the
    batches reach later sits among ordinary norms and losses, and stays a NaN."""
    w = np.asarray(run.metrics["weight_norm"], dtype=float)
    rows = np.arange(len(w))[:, None]
    last = np.maximum.accumulate(np.where(np.isfinite(w), rows, -1), axis=0)  # the last finite row so far
    prev = np.vstack([np.full((1, w.shape[1]), -1), last[:-1]])  # ... before this one
    before = np.where(prev >= 0, w[np.maximum(prev, 0), np.arange(w.shape[1])], np.nan)
    with np.errstate(invalid="ignore"):
        others = np.nanmax(np.where(np.isfinite(w), w, np.nan), axis=1, initial=0.0)  # (a row of no finite norm: 0)
    blowing = (np.abs(run.loss) >= OVERFLOW_NEAR) | (others >= OVERFLOW_NEAR)
    return inf & np.isfinite(run.loss)[:, None] & (blowing[:, None] | (before >= OVERFLOW_NEAR))


OVERFLOW_NEAR = 1e12  # a loss or norm this large: a blow-up whose weights can pass ~1.8e19 between samples
