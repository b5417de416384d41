"""Gradient clipping: the seeds' worked examples, then an exploding RNN trained without clipping, with
norm clipping, with value clipping and with ZClip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradwatch.lab import components, data, nets
from gradwatch.lab.base import Experiment, Progress, Result
from gradwatch.lab.plots import losses_and_grad_norms
from gradwatch.diagnose.signals import total_grad_norm
from gradwatch.lab.train import train

RHO = 1.5  # spectral radius of the initial W_hh: > 1/γ = 1, Pascanu's necessary condition for exploding
LR = 0.1
# Pascanu et al. 2013 (Sec. 3.2) set the threshold from the average gradient norm over many updates and
# report that half to ten times that value still converged. Here every threshold bounds the steps (no
# blow-up), but only those near the average learn: at 5x the final loss is 0.150 in quick mode (barely
# below the mean predictor's 0.167) and 1.77 in full mode; at 10x (quick, threshold 10 on an average of
# 1.28) it is 4.3. The page says so; docs/lab.md has the numbers.
THRESHOLD_FACTORS = (0.5, 5.0)


def worked_examples(clip) -> dict[str, list[float] | float]:
    """Norm clipping of g = [9, 18, 18] (‖g‖ = 27) at 5, and value clipping of [7, -6, 3] at 5."""
    g = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    g.grad = torch.tensor([9.0, 18.0, 18.0], dtype=torch.float64)
    before = float(clip.clip_norm([g], 5.0))
    after = g.grad.clone()
    v = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    v.grad = torch.tensor([7.0, -6.0, 3.0], dtype=torch.float64)
    clip.clip_value([v], 5.0)
    return {"norm_before": before, "norm_after": float(after.norm()), "factor": float(after[0] / 9.0),
            "clipped": after.tolist(), "value_clipped": v.grad.tolist()}


def exploding_rnn(hidden: int) -> nets.SequenceRegressor:
    model = nets.SequenceRegressor("rnn", hidden)
    torch.nn.init.orthogonal_(model.rnn.weight_hh_l0)
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(RHO)
    return model


def run(quick: bool, out: Path, progress: Progress) -> Result:
    clip = components.clippers()
    steps, length, hidden = (400, 10, 32) if quick else (2000, 20, 64)
    res = Result(["clipping", "diverged at step", "final loss", "test MSE", "max grad norm (pre-clip)"], [])
    ex = worked_examples(clip)
    res.check("norm clipping: ‖g‖ = 27 clipped at 5 scales g by 5/27 ≈ 0.185", abs(ex["norm_before"] - 27) < 1e-9
              and abs(ex["norm_after"] - 5) < 1e-5 and abs(ex["factor"] - 5 / 27) < 1e-6,  # torch adds 1e-6 to the norm
              norm_before=ex["norm_before"], norm_after=ex["norm_after"], factor=ex["factor"],
              clipped=str([round(x, 4) for x in ex["clipped"]]))
    res.check("value clipping at 5: [7, -6, 3] → [5, -5, 3]", ex["value_clipped"] == [5.0, -5.0, 3.0],
              result=str(ex["value_clipped"]))
    # rounded as the check's numbers are: float32 noise, [1.666666604938274, ...], read as a wrong result
    res.notes += [f"worked examples with {clip.source}: g = [9, 18, 18] (norm 27) → "
                  f"{[round(x, 4) for x in ex['clipped']]}",
                  f"exploding RNN: tanh RNN, {hidden} units, W_hh = {RHO} × orthogonal (spectral radius {RHO} > 1), "
                  f"adding problem T = {length}, plain SGD lr {LR}, batch 64, {steps} steps",
                  "norm clipping at 1; value clipping at 0.1; ZClip (z-score, α = 0.97, z = 2.5, 25 warm-up steps) "
                  "alone and with the reference package's default cap max_grad_norm = 1",
                  f"mean-predictor MSE on this task: {data.ADDING_BASELINE_MSE:.4f} (1/6)"]
    task = data.adding(length)
    methods = (("none", None), ("norm 1.0", lambda ps: clip.clip_norm(ps, 1.0)),
               ("value 0.1", lambda ps: clip.clip_value(ps, 0.1)), ("ZClip", clip.ZClip()),
               ("ZClip + cap 1.0", clip.ZClip(max_grad_norm=1.0)))
    progress.phase("training the exploding RNN 5 ways", steps * len(methods))
    runs = {}
    for label, fn in methods:
        torch.manual_seed(0)
        r = train(exploding_rnn(hidden), task, steps=steps, lr=LR, seed=0, clip=fn, label=label, progress=progress)
        runs[label] = r
        res.rows.append([label, "–" if r.diverged_at is None else r.diverged_at, r.final_loss(), r.test,
                         float(np.nanmax(total_grad_norm(r.series)))])
    res.check("without clipping the RNN's gradients explode: the loss becomes non-finite",
              runs["none"].diverged_at is not None, diverged_at=runs["none"].diverged_at or "never")
    first = float(np.mean(runs["none"].losses[:10]))
    for label in ("norm 1.0", "value 0.1", "ZClip + cap 1.0"):
        r = runs[label]
        res.check(f"{label}: every step finite and the model learns (final loss < 0.8 × the mean-predictor MSE)",
                  r.diverged_at is None and r.final_loss() < 0.8 * data.ADDING_BASELINE_MSE,
                  final=r.final_loss(), baseline=data.ADDING_BASELINE_MSE)
    average = float(np.nanmean(total_grad_norm(runs["norm 1.0"].series)))
    progress.phase("norm clipping at 0.5× and 5× the average norm", steps * len(THRESHOLD_FACTORS))
    learned = {}
    for k in THRESHOLD_FACTORS:
        torch.manual_seed(0)
        label = f"norm {k:g}× average = {k * average:.3g}"
        r = train(exploding_rnn(hidden), task, steps=steps, lr=LR, seed=0, label=label, progress=progress,
                  clip=lambda ps, c=k * average: clip.clip_norm(ps, c))
        learned[f"{k:g}x"] = r.final_loss()
        res.rows.append([label, "–" if r.diverged_at is None else r.diverged_at, r.final_loss(), r.test,
                         float(np.nanmax(total_grad_norm(r.series)))])
    res.notes.append(f"threshold rule (Pascanu et al. 2013, Sec. 3.2): the average gradient norm of the norm 1.0 run, "
                     f"{average:.3g} (before clipping), times {' and '.join(f'{k:g}' for k in THRESHOLD_FACTORS)}")
    bound = 0.8 * data.ADDING_BASELINE_MSE
    res.check(f"Pascanu's threshold rule: norm clipping at {' and '.join(f'{k:g}' for k in THRESHOLD_FACTORS)} × the "
              "average gradient norm keeps every step finite (each update bounded by lr × threshold), and at "
              f"{THRESHOLD_FACTORS[0]:g}× it learns (final loss < 0.8 × the mean-predictor MSE)",
              all(np.isfinite(v) for v in learned.values()) and learned[f"{THRESHOLD_FACTORS[0]:g}x"] < bound,
              average_norm=average, **learned, bound=bound)
    high = f"{THRESHOLD_FACTORS[-1]:g}x"
    res.notes.append(f"at {high[:-1]}× the average norm the model learns {'little' if learned[high] >= bound else 'too'}: "
                     f"final loss {learned[high]:.3g} against the bound {bound:.3g}" + (
                         " (Pascanu et al. report convergence up to 10×; this RNN tolerates a narrower range)"
                         if learned[high] >= bound else ""))
    z = runs["ZClip"]
    res.check("ZClip alone (no cap) does not tame a blow-up that starts in its warm-up and keeps growing: its "
              "threshold follows the running mean (final loss > 10 × the first loss, or non-finite)",
              z.diverged_at is not None or z.final_loss() > 10 * first, final=z.final_loss(), first=first)
    # ZClip's own threshold (mean + z·σ of the recent norms) sits above a cap of 1 on a net whose gradient
    # norm is rarely below 1: then the cap does all the clipping and ZClip + cap is norm clipping at 1.
    # Said on the page, so that the capped row is not read as ZClip's own merit.
    same = np.array_equal(runs["ZClip + cap 1.0"].losses, runs["norm 1.0"].losses)
    res.notes.append("ZClip + cap 1.0 trained " + (
        "exactly as norm 1.0 (the same loss at every step, bit for bit): the cap did all the clipping, ZClip's "
        "own threshold never bound below it, so this row shows the cap, not ZClip" if same else
        "differently from norm 1.0: ZClip's own threshold bound below the cap on some steps"))
    if same:  # the two curves lie on each other: the legend says why only one shows
        runs["ZClip + cap 1.0"].label += " (= norm 1.0)"
    res.figures.append(losses_and_grad_norms(out, "clipping", list(runs.values()),
                                             "total gradient norm before clipping (watch)"))
    return res


EXPERIMENT = Experiment(
    name="clipping",
    title="gradient clipping tames an exploding RNN",
    claim="Rescaling the gradient when its norm exceeds a threshold (or clamping each entry) bounds every "
          "update, so an RNN whose gradients explode keeps training instead of diverging.",
    expected="worked examples exact (27 → 5, factor 0.185; [7, −6, 3] → [5, −5, 3]); the unclipped RNN "
             "diverges; norm clipping, value clipping and capped ZClip stay finite and learn.",
    source="seed claims; Pascanu, Mikolov, Bengio 2013; Kumar et al. 2025 (ZClip)",
    run=run,
)
