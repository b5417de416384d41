"""A learning-rate sweep on one net: too high diverges, too low stalls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from gradwatch.lab import data, nets
from gradwatch.lab.base import Experiment, Progress, Result
from gradwatch.lab.plots import losses_and_grad_norms
from gradwatch.diagnose.signals import total_grad_norm
from gradwatch.lab.train import train

RATES = (1e-5, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Full mode trains 2000 steps, over which lr 1e-5 does lower the loss by 9%: its lowest rate is 1e-6.
RATES_FULL = (1e-6,) + RATES[1:]
STALL = 0.05  # the lowest rate's loss must fall by less than this fraction


def first_loss(losses: np.ndarray, window: int = 20) -> float:
    """Mean loss of the first `window` steps; for a run that turns non-finite within them, its step-0
    loss: the mean would be inf (or, over the finite steps of a blow-up, 1e19), hiding that it
    started where the others did."""
    head = losses[:window]
    if len(head) and not np.isfinite(head).all():
        return float(head[0])
    return float(np.mean(head)) if len(head) else math.nan


def run(quick: bool, out: Path, progress: Progress) -> Result:
    steps, width = (300, 64) if quick else (2000, 128)
    rates = RATES if quick else RATES_FULL
    task = data.digits()
    res = Result(["lr", "first loss", "final loss", "relative decrease", "diverged at step", "max grad norm"], [])
    res.notes.append(f"4 hidden ReLU layers of {width}, He init, plain SGD, batch 64, {steps} steps on digits")
    res.notes.append("first / final loss: mean of the first / last 20 steps; a run stops at its first non-finite loss: its "
                     "final loss is then inf and, if that came within 20 steps, its first loss is step 0's")
    progress.phase(f"training {len(rates)} learning rates", steps * len(rates))
    runs, stats = [], {}
    for lr in rates:
        torch.manual_seed(0)
        r = train(nets.mlp(64, width, 4, 10, "relu", "he"), task, steps=steps, lr=lr, seed=0,
                  label=f"lr {lr:g}", progress=progress)
        first = first_loss(r.losses)
        final = r.final_loss()
        decrease = (first - final) / first if math.isfinite(final) and math.isfinite(first) else math.nan
        stats[lr] = (first, final, decrease, r.diverged_at)
        runs.append(r)
        res.rows.append([lr, first, final, decrease, "–" if r.diverged_at is None else r.diverged_at,
                         float(np.nanmax(total_grad_norm(r.series)))])
    high, low = stats[rates[-1]], stats[rates[0]]
    res.check(f"too high (lr {rates[-1]:g}) diverges: the loss becomes non-finite",
              high[3] is not None, diverged_at=high[3] if high[3] is not None else "never")
    res.check(f"too low (lr {rates[0]:g}) stalls: the loss falls by less than {STALL:.0%}",
              0 <= low[2] < STALL if math.isfinite(low[2]) else False, decrease=low[2])
    best = min(rates, key=lambda lr: stats[lr][1])
    res.check("the best rate lies strictly between the extremes, and learns (final < 0.2 × first)",
              best not in (rates[0], rates[-1]) and stats[best][1] < 0.2 * stats[best][0],
              best_lr=best, first=stats[best][0], final=stats[best][1])
    res.figures.append(losses_and_grad_norms(out, "lr_sweep", runs))
    return res


EXPERIMENT = Experiment(
    name="lr",
    title="learning-rate sweep",
    claim="If η is too high, the updates feed back positively and the loss diverges; if it is too small, "
          "the loss barely moves.",
    expected=f"lr {RATES[-1]:g} reaches a non-finite loss; lr {RATES[0]:g} (1e-6 in full mode) lowers the loss by < 5%; "
             "the best rate is in between.",
    source="seed claims",
    run=run,
)
