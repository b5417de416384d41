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
    res.notes += [f"worked examples with {clip.source}: g = [9, 18, 18] (norm 27) → {ex['clipped']}",
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
    z = runs["ZClip"]
    res.check("ZClip alone (no cap) does not tame a blow-up that starts in its warm-up and keeps growing: its "
              "threshold follows the running mean (final loss > 10 × the first loss, or non-finite)",
              z.diverged_at is not None or z.final_loss() > 10 * first, final=z.final_loss(), first=first)
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
